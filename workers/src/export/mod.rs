//! Exports of merged windows.

pub mod sqlite;
