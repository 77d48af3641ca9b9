-- Deployment generations (core.deployments).

-- name: newest_generation
-- The newest allocated generation, or NULL when none exists.
SELECT max(generation) FROM core.deployments;

-- name: generation_exists
-- Whether generation $1 was allocated.
SELECT EXISTS (SELECT 1 FROM core.deployments WHERE generation = $1);

-- name: allocate_generation
-- Allocate the next generation atomically. $1 reference, $2 deployed_by, $3 tag.
INSERT INTO core.deployments (reference, deployed_by, tag)
VALUES ($1, $2, $3)
RETURNING generation, reference, deployed_at, deployed_by, tag;

-- name: latest_deployments
-- The newest $1 deployments.
SELECT generation, reference, deployed_at, deployed_by, tag
FROM core.deployments
ORDER BY generation DESC
LIMIT $1;
