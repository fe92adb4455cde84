//! How stored rows become records: every record type derives `sqlx::FromRow`, and [`decode`] turns a
//! column that does not decode into [`StoreError::Corrupt`] naming the table, the row and the column.
//! Nothing read from the database is replaced by a default.
//!
//! Enums stored as text are column types themselves ([`text_enum_columns!`], through their
//! `TryFrom<String>`): sqlx 0.8's `#[sqlx(try_from = "String")]` would lose the conversion's error (its
//! message becomes "unprintable error"), and with it the value to name. sqlx's `Json` does not support the
//! `Any` driver, and an integer flag read as `!= 0` would take any value for true: [`JsonText`] and
//! [`Flag`] decode such columns strictly, for the derives' `#[sqlx(try_from = "…")]`.

use std::collections::{BTreeMap, BTreeSet};

use serde::de::DeserializeOwned;
use sqlx::any::{Any, AnyRow, AnyTypeInfo, AnyValueRef};
use sqlx::error::BoxDynError;
use sqlx::{Decode, Row, Type};
use tartarus_scheduler::{NodeState, Resources};

use crate::StoreError;

/// A record type read from one table: the table, and the columns that name a row of it in errors.
pub(crate) trait Record: for<'r> sqlx::FromRow<'r, AnyRow> {
    const TABLE: &'static str;
    const KEY: &'static [&'static str];
}

/// Reads a record from a row; a column that does not decode is [`StoreError::Corrupt`].
pub(crate) fn decode<T: Record>(row: &AnyRow) -> Result<T, StoreError> {
    T::from_row(row).map_err(|e| match e {
        sqlx::Error::ColumnDecode { index, source } => StoreError::Corrupt {
            table: T::TABLE,
            id: row_key(row, T::KEY),
            // `Row::try_get` quotes the column name, the derive's `try_from` does not.
            column: index.trim_matches('"').to_string(),
            source,
        },
        other => StoreError::Database(other),
    })
}

/// The key of a row as text (`a/b` for a composite key), for messages.
fn row_key(row: &AnyRow, columns: &[&str]) -> String {
    let part = |column: &&str| {
        row.try_get::<String, _>(*column)
            .or_else(|_| row.try_get::<i64, _>(*column).map(|n| n.to_string()))
            .unwrap_or_else(|_| "?".to_string())
    };
    columns.iter().map(part).collect::<Vec<_>>().join("/")
}

/// A stored text value that names nothing this version knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown value '{value}', expected {expected}")]
pub struct UnknownValue {
    pub value: String,
    /// The values this version knows, for the message.
    pub expected: &'static str,
}

/// Makes enums stored as text column types, read through their `TryFrom<String, Error = UnknownValue>`.
macro_rules! text_enum_columns {
    ($($ty:ty),* $(,)?) => {$(
        impl Type<Any> for $ty {
            fn type_info() -> AnyTypeInfo {
                <String as Type<Any>>::type_info()
            }

            fn compatible(ty: &AnyTypeInfo) -> bool {
                <String as Type<Any>>::compatible(ty)
            }
        }

        impl<'r> Decode<'r, Any> for $ty {
            fn decode(value: AnyValueRef<'r>) -> Result<Self, BoxDynError> {
                let text = <String as Decode<'r, Any>>::decode(value)?;
                Ok(<$ty>::try_from(text)?)
            }
        }
    )*};
}

text_enum_columns!(
    crate::Role,
    crate::SandboxStatus,
    crate::Lane,
    crate::QueueState,
    crate::LedgerState,
    crate::TaskStatus,
);

/// A TEXT column holding JSON, decoded into `T` (the field's type, through one of the `From` impls
/// below).
pub(crate) struct JsonText<T>(T);

impl<T> Type<Any> for JsonText<T> {
    fn type_info() -> AnyTypeInfo {
        <String as Type<Any>>::type_info()
    }

    fn compatible(ty: &AnyTypeInfo) -> bool {
        <String as Type<Any>>::compatible(ty)
    }
}

impl<'r, T: DeserializeOwned> Decode<'r, Any> for JsonText<T> {
    fn decode(value: AnyValueRef<'r>) -> Result<Self, BoxDynError> {
        let text = <String as Decode<'r, Any>>::decode(value)?;
        Ok(JsonText(serde_json::from_str(&text)?))
    }
}

impl<K, V> From<JsonText<BTreeMap<K, V>>> for BTreeMap<K, V> {
    fn from(column: JsonText<BTreeMap<K, V>>) -> Self {
        column.0
    }
}

impl<T> From<JsonText<BTreeSet<T>>> for BTreeSet<T> {
    fn from(column: JsonText<BTreeSet<T>>) -> Self {
        column.0
    }
}

impl<T> From<JsonText<Vec<T>>> for Vec<T> {
    fn from(column: JsonText<Vec<T>>) -> Self {
        column.0
    }
}

impl From<JsonText<Resources>> for Resources {
    fn from(column: JsonText<Resources>) -> Self {
        column.0
    }
}

/// A node's state column: the scheduler's [`NodeState`] by its name.
pub(crate) struct NodeStateText(NodeState);

impl Type<Any> for NodeStateText {
    fn type_info() -> AnyTypeInfo {
        <String as Type<Any>>::type_info()
    }

    fn compatible(ty: &AnyTypeInfo) -> bool {
        <String as Type<Any>>::compatible(ty)
    }
}

impl<'r> Decode<'r, Any> for NodeStateText {
    fn decode(value: AnyValueRef<'r>) -> Result<Self, BoxDynError> {
        let text = <String as Decode<'r, Any>>::decode(value)?;
        [NodeState::Ready, NodeState::Unreachable, NodeState::Draining]
            .into_iter()
            .find(|state| state.as_str() == text)
            .map(NodeStateText)
            .ok_or_else(|| {
                Box::new(UnknownValue {
                    value: text,
                    expected: "ready, unreachable or draining",
                })
                .into()
            })
    }
}

impl From<NodeStateText> for NodeState {
    fn from(column: NodeStateText) -> Self {
        column.0
    }
}

/// An INTEGER column holding a boolean: 0 or 1, anything else is an error.
pub(crate) struct Flag(bool);

impl Type<Any> for Flag {
    fn type_info() -> AnyTypeInfo {
        <i64 as Type<Any>>::type_info()
    }

    fn compatible(ty: &AnyTypeInfo) -> bool {
        <i64 as Type<Any>>::compatible(ty)
    }
}

impl<'r> Decode<'r, Any> for Flag {
    fn decode(value: AnyValueRef<'r>) -> Result<Self, BoxDynError> {
        match <i64 as Decode<'r, Any>>::decode(value)? {
            0 => Ok(Flag(false)),
            1 => Ok(Flag(true)),
            other => Err(Box::new(UnknownValue {
                value: other.to_string(),
                expected: "0 or 1",
            })),
        }
    }
}

impl From<Flag> for bool {
    fn from(flag: Flag) -> Self {
        flag.0
    }
}
