//! Test support: the same store tests run against SQLite and PostgreSQL.
//!
//! PostgreSQL comes from `TARTARUS_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`);
//! each test gets a fresh database, dropped when its [`TestStore`] goes away. A server that is not there
//! fails the test (loudly, by design): `.ci/run` starts one when none listens.

use crate::{Backend, Store, StoreError};

/// The server the tests create databases on.
pub fn admin_url() -> String {
    std::env::var("TARTARUS_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// A store on a fresh database, removed on drop.
pub struct TestStore {
    pub store: Store,
    /// SQLite: the data directory.
    pub dir: Option<tempfile::TempDir>,
    /// PostgreSQL: the database's name and URL.
    pub database: Option<(String, String)>,
}

impl TestStore {
    pub async fn sqlite() -> TestStore {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = Store::open(dir.path()).await.expect("opening SQLite");
        TestStore {
            store,
            dir: Some(dir),
            database: None,
        }
    }

    pub async fn postgres() -> TestStore {
        let (name, url) = fresh_database().await;
        let store = Store::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("connecting to {url}: {e:?}"));
        assert_eq!(store.backend(), Backend::Postgres);
        TestStore {
            store,
            dir: None,
            database: Some((name, url)),
        }
    }

    /// Opens the same database again (a restart).
    pub async fn reopen(&self) -> Store {
        match (&self.dir, &self.database) {
            (Some(dir), _) => Store::open(dir.path()).await.expect("reopening SQLite"),
            (_, Some((_, url))) => Store::connect(url).await.expect("reopening PostgreSQL"),
            _ => unreachable!("a test store has a directory or a database"),
        }
    }
}

impl TestStore {
    /// Runs `sql` past the schema's CHECK constraints, to write what a damaged database, or one written
    /// by a newer version, may hold.
    pub async fn execute_unchecked(&self, sql: &str) {
        use sqlx::Executor;
        let mut conn = self.store.pool.acquire().await.expect("a connection");
        match self.store.backend {
            // Per connection: set, write and reset on the same one.
            Backend::Sqlite => {
                conn.execute("PRAGMA ignore_check_constraints = ON")
                    .await
                    .expect("pragma");
                conn.execute(sql).await.expect("unchecked write");
                conn.execute("PRAGMA ignore_check_constraints = OFF")
                    .await
                    .expect("pragma");
            }
            // The test database is thrown away: drop every CHECK constraint.
            Backend::Postgres => {
                conn.execute(
                    "DO $$ DECLARE c record; BEGIN \
                     FOR c IN SELECT conrelid::regclass AS t, conname FROM pg_constraint \
                     WHERE contype = 'c' AND connamespace = current_schema()::regnamespace LOOP \
                     EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', c.t, c.conname); END LOOP; END $$",
                )
                .await
                .expect("dropping CHECK constraints");
                conn.execute(sql).await.expect("unchecked write");
            }
        }
    }
}

/// Asserts that `result` is [`StoreError::Corrupt`] for this table, row and column, and that its chain
/// names `value`.
#[track_caller]
pub fn assert_corrupt<T: std::fmt::Debug>(
    result: Result<T, StoreError>,
    (table, id, column): (&str, &str, &str),
    value: &str,
) {
    let err = result.expect_err("a corrupt row must not read");
    let chain = std::iter::successors(Some(&err as &dyn std::error::Error), |e| e.source())
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(": ");
    match &err {
        StoreError::Corrupt {
            table: t,
            id: i,
            column: c,
            ..
        } => assert_eq!((*t, i.as_str(), c.as_str()), (table, id, column), "{chain}"),
        other => panic!("expected a corrupt {table} row, got {other:?}"),
    }
    assert!(chain.contains(value), "the error must name '{value}': {chain}");
}

/// Both engines.
pub async fn stores() -> Vec<TestStore> {
    vec![TestStore::sqlite().await, TestStore::postgres().await]
}

/// Creates `tartarus_test_<random>` on the admin server; returns its name and URL.
pub async fn fresh_database() -> (String, String) {
    use sqlx::Connection;
    let admin = admin_url();
    let name = format!(
        "tartarus_test_{}",
        tartarus_hostsys::random_hex(6).expect("randomness")
    );
    let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap_or_else(|e| {
        panic!(
            "PostgreSQL is not reachable at {admin} ({e}): start it (`.ci/run` does) or set \
             TARTARUS_TEST_DATABASE_URL"
        )
    });
    sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {name}").as_str())
        .await
        .expect("CREATE DATABASE");
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
    (name.clone(), format!("{base}/{name}"))
}

impl Drop for TestStore {
    fn drop(&mut self) {
        if let Some((name, _)) = self.database.take() {
            let admin = admin_url();
            // Drop runs inside the test's runtime: use a thread with its own.
            let _ = std::thread::spawn(move || {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                    return;
                };
                runtime.block_on(async move {
                    use sqlx::Connection;
                    if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                        let _ = sqlx::Executor::execute(
                            &mut conn,
                            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str(),
                        )
                        .await;
                    }
                });
            })
            .join();
        }
    }
}
