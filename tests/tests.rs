//! The integration suite: one binary, one module per concern, every test
//! against the real PostgreSQL in a database of its own.

mod support;

mod aftercare;
mod audit;
mod aws;
mod backups;
mod cli;
mod config;
mod console;
mod database;
mod demo;
mod deploy;
mod engine;
mod enqueue;
mod evidence;
mod image;
mod inventory;
mod keyring;
mod keyring_use;
mod kryoptic;
mod migrate;
mod observe;
mod onion;
mod pause;
mod pgcluster;
mod pkcs11;
mod plan;
mod reliability;
mod safety;
mod scale;
mod signatures;
mod slh_dsa_vectors;
mod standby;
mod status;
mod vault;
mod wrappers;
