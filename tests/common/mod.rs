//! Shared helpers for lcfs integration tests. Each test file does `mod common;`.
#![allow(dead_code)]

pub mod lab;
pub mod lcfs;
pub mod tree;
