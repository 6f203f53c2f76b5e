#![allow(clippy::unwrap_used)]
//! Component tests of `klio-s3` against a real S3-compatible server (moto), one server per
//! test. Without moto the tests fail, saying how to install it.

mod behaviour;
mod errors;
mod moto;
mod repository;
mod tls;
