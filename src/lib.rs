//! pgdr: PostgreSQL disaster recovery on AWS in one command.
//!
//! The library holds the steps, the executor, the state file and the AWS clients; it returns
//! data and never prints. The `pgdr` binary (`src/main.rs`, `src/cli.rs`) renders it.

pub mod agent;
pub mod aws;
pub mod backend;
pub mod clients;
pub mod config;
pub mod cx;
pub mod error;
pub mod exec;
pub mod failover;
pub mod graph;
pub mod health;
pub mod ops;
pub mod reads;
pub mod render;
pub mod reprotect;
pub mod silence;
pub mod state;
pub mod steps;
pub mod switchover;
pub mod wait;
