//! The harness's real services: RabbitMQ, PostgreSQL and Garage (S3).
