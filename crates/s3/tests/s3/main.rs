#![allow(clippy::unwrap_used)]
//! Component tests of `klio-s3` against real S3-compatible servers, one server per test:
//! moto, and for the store's contract versitygw too (a production S3 gateway). Without them
//! the tests fail, saying how to install them.

mod behaviour;
mod errors;
mod moto;
mod repository;
mod tls;
mod versitygw;
