//! A fresh PostgreSQL database per test on the server at `TARTARUS_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`), created and dropped with `psql`.
#![allow(dead_code, clippy::unwrap_used)]

use std::process::Command;

pub fn admin_url() -> String {
    std::env::var("TARTARUS_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// A fresh database, dropped on drop.
pub struct Database {
    pub name: String,
    pub url: String,
}

impl Database {
    pub fn new() -> Database {
        let name = format!("tartarus_cli_{}", std::process::id()) + &format!("_{:x}", rand_suffix());
        let admin = admin_url();
        let out = Command::new("psql")
            .args([
                &admin,
                "-v",
                "ON_ERROR_STOP=1",
                "-qc",
                &format!("CREATE DATABASE {name}"),
            ])
            .output()
            .expect("psql (postgresql-client) is needed for these tests");
        assert!(
            out.status.success(),
            "cannot create a test database on {admin}: {} (start PostgreSQL or set TARTARUS_TEST_DATABASE_URL)",
            String::from_utf8_lossy(&out.stderr)
        );
        let base = admin.rsplit_once('/').unwrap().0.to_string();
        Database {
            url: format!("{base}/{name}"),
            name,
        }
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

impl Drop for Database {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([
                &admin_url(),
                "-qc",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ])
            .output();
    }
}
