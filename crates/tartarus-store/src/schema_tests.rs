//! The SQLite and PostgreSQL migrations must end with the same schema: the same tables, the same
//! columns (name, type class, nullability) and the same primary keys. Queries are written once for both
//! engines, so a column that is nullable, or an integer, on one engine only is a bug waiting for the
//! other engine's users.
//!
//! Two differences are the engines', not ours, and are read as what they mean:
//! - an SQLite `INTEGER PRIMARY KEY` is the rowid, which cannot be NULL, though `pragma_table_info` says
//!   it may be;
//! - a PostgreSQL `rowid` identity column stands for SQLite's implicit rowid (queries order by it): it
//!   must be an integer that is never NULL, and the SQLite table must have a rowid.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::{AnyPool, Row};

use crate::testing::TestStore;
use crate::Store;

/// A column as both engines can describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Column {
    /// `integer`, `text`, `real`, `blob` or `bool` (anything else is shown as it is declared).
    class: String,
    not_null: bool,
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Table {
    columns: BTreeMap<String, Column>,
    primary_key: Vec<String>,
}

type Schema = BTreeMap<String, Table>;

/// The type class of a declared type, on either engine.
fn class(declared: &str) -> String {
    let declared = declared.to_ascii_lowercase();
    match declared.as_str() {
        "integer" | "int" | "bigint" | "smallint" | "int2" | "int4" | "int8" => "integer",
        "text" | "character varying" | "varchar" | "character" => "text",
        "real" | "double precision" | "float4" | "float8" => "real",
        "blob" | "bytea" => "blob",
        "boolean" | "bool" => "bool",
        _ => return format!("'{declared}'"),
    }
    .to_string()
}

async fn sqlite_schema(pool: &AnyPool) -> Schema {
    let tables = sqlx::query(
        "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%' \
         AND name <> '_sqlx_migrations' ORDER BY name",
    )
    .fetch_all(pool)
    .await
    .expect("listing SQLite tables");
    let mut schema = Schema::new();
    for table in tables {
        let name: String = table.get("name");
        let rows = sqlx::query(r#"SELECT name, type, "notnull" AS not_null, pk FROM pragma_table_info($1)"#)
            .bind(&name)
            .fetch_all(pool)
            .await
            .expect("pragma_table_info");
        let mut described = Table::default();
        let mut key = Vec::new();
        for row in &rows {
            let column: String = row.get("name");
            let declared: String = row.get("type");
            let position: i64 = row.get("pk");
            if position > 0 {
                key.push((position, column.clone()));
            }
            let not_null = row.get::<i64, _>("not_null") != 0;
            described.columns.insert(
                column,
                Column {
                    class: class(&declared),
                    not_null,
                },
            );
        }
        key.sort();
        described.primary_key = key.into_iter().map(|(_, column)| column).collect();
        if let [only] = &described.primary_key[..] {
            let column = described.columns.get_mut(only).expect("the key is a column");
            if column.class == "integer" {
                column.not_null = true; // the rowid
            }
        }
        schema.insert(name, described);
    }
    schema
}

async fn postgres_schema(pool: &AnyPool) -> Schema {
    let columns = sqlx::query(
        "SELECT table_name::text AS table_name, column_name::text AS column_name, \
         data_type::text AS data_type, is_nullable::text AS is_nullable \
         FROM information_schema.columns \
         WHERE table_schema = current_schema() AND table_name <> '_sqlx_migrations' \
         ORDER BY table_name, ordinal_position",
    )
    .fetch_all(pool)
    .await
    .expect("information_schema.columns");
    let mut schema = Schema::new();
    for row in &columns {
        let table: String = row.get("table_name");
        let declared: String = row.get("data_type");
        schema.entry(table).or_default().columns.insert(
            row.get("column_name"),
            Column {
                class: class(&declared),
                not_null: row.get::<String, _>("is_nullable") == "NO",
            },
        );
    }
    let keys = sqlx::query(
        "SELECT tc.table_name::text AS table_name, kcu.column_name::text AS column_name \
         FROM information_schema.table_constraints tc \
         JOIN information_schema.key_column_usage kcu ON kcu.constraint_name = tc.constraint_name \
           AND kcu.table_schema = tc.table_schema AND kcu.table_name = tc.table_name \
         WHERE tc.constraint_type = 'PRIMARY KEY' AND tc.table_schema = current_schema() \
           AND tc.table_name <> '_sqlx_migrations' \
         ORDER BY tc.table_name, kcu.ordinal_position",
    )
    .fetch_all(pool)
    .await
    .expect("primary keys");
    for row in &keys {
        let table: String = row.get("table_name");
        schema
            .entry(table)
            .or_default()
            .primary_key
            .push(row.get("column_name"));
    }
    schema
}

/// What differs, one line each (empty: the same schema).
fn diff(sqlite: &Schema, postgres: &Schema) -> Vec<String> {
    let show = |c: Option<&Column>| match c {
        None => "missing".to_string(),
        Some(c) => format!("{} {}", c.class, if c.not_null { "not null" } else { "null" }),
    };
    let mut lines = Vec::new();
    let names: BTreeSet<&String> = sqlite.keys().chain(postgres.keys()).collect();
    for name in names {
        let (Some(s), Some(p)) = (sqlite.get(name), postgres.get(name)) else {
            let only = if sqlite.contains_key(name) {
                "sqlite"
            } else {
                "postgres"
            };
            lines.push(format!("table {name}: only on {only}"));
            continue;
        };
        let columns: BTreeSet<&String> = s.columns.keys().chain(p.columns.keys()).collect();
        for column in columns {
            let (a, b) = (s.columns.get(column), p.columns.get(column));
            if a != b {
                lines.push(format!(
                    "{name}.{column}: sqlite {}, postgres {}",
                    show(a),
                    show(b)
                ));
            }
        }
        if s.primary_key != p.primary_key {
            lines.push(format!(
                "{name} primary key: sqlite ({}), postgres ({})",
                s.primary_key.join(", "),
                p.primary_key.join(", ")
            ));
        }
    }
    lines
}

#[tokio::test]
async fn test_sqlite_and_postgres_migrations_end_with_the_same_schema() {
    let (sqlite, postgres) = (TestStore::sqlite().await, TestStore::postgres().await);
    let lite = sqlite_schema(&sqlite.store.pool).await;
    let mut pg = postgres_schema(&postgres.store.pool).await;
    assert!(
        lite.contains_key("sandboxes") && lite.contains_key("nodes"),
        "{lite:?}"
    );
    for (name, table) in pg.iter_mut() {
        if let Some(rowid) = table.columns.remove("rowid") {
            let implicit = Column {
                class: "integer".into(),
                not_null: true,
            };
            assert_eq!(rowid, implicit, "{name}.rowid on postgres");
            let has_rowid = sqlx::query(&format!("SELECT rowid FROM {name} LIMIT 0"))
                .execute(&sqlite.store.pool)
                .await;
            assert!(has_rowid.is_ok(), "{name} on sqlite has no rowid to order by");
        }
    }
    let differences = diff(&lite, &pg);
    assert!(
        differences.is_empty(),
        "the migrations end with different schemas:\n  {}",
        differences.join("\n  ")
    );
}

#[test]
fn test_diff_names_tables_columns_and_keys_that_differ() {
    let column = |class: &str, not_null| Column {
        class: class.into(),
        not_null,
    };
    let table = |columns: &[(&str, Column)], key: &[&str]| Table {
        columns: columns.iter().map(|(n, c)| (n.to_string(), c.clone())).collect(),
        primary_key: key.iter().map(|k| k.to_string()).collect(),
    };
    let sqlite = Schema::from([
        (
            "a".to_string(),
            table(
                &[("id", column("text", false)), ("n", column("integer", true))],
                &["id"],
            ),
        ),
        ("old".to_string(), Table::default()),
    ]);
    let postgres = Schema::from([(
        "a".to_string(),
        table(
            &[
                ("id", column("text", true)),
                ("n", column("integer", true)),
                ("x", column("'jsonb'", false)),
            ],
            &["id", "n"],
        ),
    )]);
    assert_eq!(
        diff(&sqlite, &postgres),
        [
            "a.id: sqlite text null, postgres text not null",
            "a.x: sqlite missing, postgres 'jsonb' null",
            "a primary key: sqlite (id), postgres (id, n)",
            "table old: only on sqlite",
        ]
    );
    assert!(diff(&sqlite, &sqlite).is_empty());
    assert_eq!(class("BIGINT"), class("INTEGER"));
    assert_eq!(class("bytea"), class("BLOB"));
}

#[tokio::test]
async fn test_sqlite_key_rebuild_keeps_rows_their_order_and_references() {
    use sqlx::{Connection, Executor};
    // A database as version 0011 left it, with rows in every kind of rebuilt table.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let url = format!("sqlite://{}/state.db?mode=rwc", dir.path().display());
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&url).await.expect("connecting");
    let mut before = sqlx::migrate!("./migrations/sqlite");
    before.migrations = before
        .migrations
        .iter()
        .filter(|m| m.version <= 11)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    before.run(&mut conn).await.expect("migrating to 0011");
    conn.execute(
        "INSERT INTO api_keys (rowid, id, tenant, role, key_hash, created_ms) VALUES (4, 'key_b', 't', 'user', x'02', 5); \
         INSERT INTO api_keys (rowid, id, tenant, role, key_hash, created_ms) VALUES (9, 'key_a', 't', 'admin', x'01', 5); \
         INSERT INTO episodes (id, sandbox, tenant, created_ms, envelope, facts) VALUES ('ep1', 'sb1', 't', 1, x'00', '{}'); \
         INSERT INTO signals (id, episode, tenant, evaluator, name, at_ms, envelope) \
           VALUES ('sig1', 'ep1', 't', 'judge', 'pass', 2, x'00'); \
         INSERT INTO sandboxes (id, tenant, status, spec, created_ms, dir, paused, node) \
           VALUES ('sb1', 't', 'running', '{}', 1, '/d', 1, 'n1'); \
         INSERT INTO nodes (id, instance, epoch, address, labels, taints, capacity, usage, state, registered_ms, \
           last_heartbeat_ms, api_key, pools, quarantine) VALUES ('n1', 'i', 3, '10.0.0.1:1', '{}', '[]', \
           '{\"cpu_millis\":1000}', '{}', 'draining', 1, 2, 'tk', '[\"inferno\"]', 1)",
    )
    .await
    .expect("rows at 0011");
    conn.close().await.expect("closing");

    let store = Store::open(dir.path()).await.expect("migrating to the latest");
    let keys: Vec<String> = store
        .list_keys()
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.id)
        .collect();
    assert_eq!(keys, ["key_b", "key_a"], "insertion order (the rowid) is kept");
    let rowids: Vec<i64> = sqlx::query_scalar("SELECT rowid FROM api_keys ORDER BY rowid")
        .fetch_all(&store.pool)
        .await
        .unwrap();
    assert_eq!(rowids, [4, 9], "the rowids themselves are kept");
    let sandbox = store.sandbox("sb1", None).await.unwrap().expect("sb1");
    assert!(sandbox.paused && sandbox.node.as_deref() == Some("n1"));
    assert_eq!(store.signals(Some("ep1"), None).await.unwrap()[0].id, "sig1");
    let node = store.node("n1").await.unwrap().expect("n1");
    assert_eq!(
        (node.epoch, node.state, node.quarantine, node.capacity.cpu_millis),
        (3, tartarus_scheduler::NodeState::Draining, true, 1000)
    );
    // The signal still refers to its episode, and now the key may not be NULL.
    let orphan = sqlx::query(
        "INSERT INTO signals (id, episode, tenant, evaluator, name, at_ms, envelope) \
         VALUES ('sig2', 'nope', 't', 'judge', 'pass', 2, x'00')",
    )
    .execute(&store.pool)
    .await;
    assert!(orphan.is_err(), "foreign keys are on again and enforced");
    let null_id = sqlx::query(
        "INSERT INTO sandboxes (id, tenant, status, spec, created_ms, dir) VALUES (NULL, 't', 'running', '{}', 1, '/d')",
    )
    .execute(&store.pool)
    .await;
    assert!(null_id.is_err(), "a NULL key is refused");
}
