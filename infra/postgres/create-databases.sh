#!/bin/sh
# Run once by the postgres image on an empty data directory (/docker-entrypoint-initdb.d/):
# one database per consumer named in EASYMLOPS_DATABASES, owned by POSTGRES_USER. Dagster and
# MLflow both create a `runs` table, so they cannot share one.
set -eu
for database in ${EASYMLOPS_DATABASES:?names of the databases to create}; do
  echo "creating database ${database}"
  psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER}" --dbname postgres \
    -c "CREATE DATABASE \"${database}\" OWNER \"${POSTGRES_USER}\""
done
