//! Integration tests: the pgdr binary against a private emulator per test.

mod harness;
mod alarms;
mod data;
mod dr;
mod inputs;
mod network;
mod ops;
mod reliability;
