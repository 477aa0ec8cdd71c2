//! Integration tests: the pgdr binary against a private emulator per test.

mod alarms;
mod data;
mod dr;
mod harness;
mod inputs;
mod network;
mod ops;
mod reliability;
mod snapshots;
mod team;
