-- One database and one login per service: a service can read and write only its own tables.
-- Run once by the postgres image's entrypoint, on an empty data volume (docker-entrypoint-initdb.d).
-- The passwords are for local development only; in production set them from a secret store and
-- pass the matching <SERVICE>_DATABASE_URL to each service.
-- Keep in step with cancelflow.settings.SERVICES and docker-compose.yml (tests/unit/test_compose.py).

CREATE USER billing WITH PASSWORD 'billing';
CREATE DATABASE billing OWNER billing;
REVOKE ALL ON DATABASE billing FROM PUBLIC;

CREATE USER provisioning WITH PASSWORD 'provisioning';
CREATE DATABASE provisioning OWNER provisioning;
REVOKE ALL ON DATABASE provisioning FROM PUBLIC;

CREATE USER payment_gateway WITH PASSWORD 'payment_gateway';
CREATE DATABASE payment_gateway OWNER payment_gateway;
REVOKE ALL ON DATABASE payment_gateway FROM PUBLIC;

CREATE USER dispute WITH PASSWORD 'dispute';
CREATE DATABASE dispute OWNER dispute;
REVOKE ALL ON DATABASE dispute FROM PUBLIC;

CREATE USER notification WITH PASSWORD 'notification';
CREATE DATABASE notification OWNER notification;
REVOKE ALL ON DATABASE notification FROM PUBLIC;

CREATE USER status_tracker WITH PASSWORD 'status_tracker';
CREATE DATABASE status_tracker OWNER status_tracker;
REVOKE ALL ON DATABASE status_tracker FROM PUBLIC;
