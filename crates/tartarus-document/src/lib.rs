//! Positions in configuration documents (templates, policies) written as YAML or JSON, so that every error
//! can say `file:line:column: message` and name the offending key.
//!
//! serde_yaml_ng reports where parsing failed but keeps no positions in parsed values, so errors found after
//! parsing (a bad value, a contradiction) are located by searching the text for the key's path:
//! [`find_key`] finds a mapping key (block `key:`, flow `{key: …}` or quoted JSON `"key":`), skipping
//! comments; [`line_column`] turns an offset into 1-based line and column.

/// Whether `id` is a valid document id (a template's or a policy's): 1-63 lower-case letters, digits and
/// `-`, not starting with `-`.
pub fn valid_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0] != b'-'
        && bytes
            .iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A document that cannot be used: where (`file:line:column` when known) and why, naming the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentError {
    /// The file (or other source) the text came from.
    pub file: String,
    /// 1-based line and column, when known.
    pub location: Option<(usize, usize)>,
    /// Dotted path of the offending key (`network.allowed_cidrs[1]`), when the error is about one.
    pub key: Option<String>,
    /// What is wrong and what to change.
    pub message: String,
}

impl std::fmt::Display for DocumentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.location {
            Some((line, column)) => write!(f, "{}:{line}:{column}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for DocumentError {}

impl DocumentError {
    /// A YAML or shape error of the text from `file`, its position moved to the front.
    pub fn from_yaml(e: &serde_yaml_ng::Error, file: &str) -> DocumentError {
        let SyntaxError {
            location,
            key,
            message,
        } = syntax_error(e);
        DocumentError {
            file: file.to_string(),
            location,
            key,
            message,
        }
    }
}

/// A parse error of serde_yaml_ng in document terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    /// 1-based line and column, when the parser knows them.
    pub location: Option<(usize, usize)>,
    /// The key involved: the value's path (`network.allowed_cidrs[1]`) and/or the field it names.
    pub key: Option<String>,
    /// The message without serde_yaml_ng's own ` at line L column C` (the caller puts the position first).
    pub message: String,
}

/// Splits a serde_yaml_ng error into position, key and message.
pub fn syntax_error(e: &serde_yaml_ng::Error) -> SyntaxError {
    let text = e.to_string();
    let location = e.location().map(|l| (l.line(), l.column()));
    let message = match location {
        Some((line, column)) => text.replacen(&format!(" at line {line} column {column}"), "", 1),
        None => text,
    };
    let path = message
        .split_once(": ")
        .map(|(path, _)| path)
        .filter(|p| !p.contains(' '));
    // An unknown, missing or duplicate field is named in backquotes.
    let field = message
        .split_once("field `")
        .and_then(|(_, rest)| rest.split_once('`'))
        .map(|(field, _)| field);
    let key = match (path, field) {
        (Some(path), Some(field)) => Some(format!("{path}.{field}")),
        (path, field) => path.or(field).map(str::to_string),
    };
    SyntaxError {
        location,
        key,
        message,
    }
}

/// The byte offset (of the opening quote, if quoted) of `key` used as a mapping key at or after `from`.
/// With `line_start`, only a key that starts its line (a top-level key of block YAML) counts.
pub fn find_key(text: &str, key: &str, from: usize, line_start: bool) -> Option<usize> {
    if key.is_empty() {
        return None;
    }
    let mut search = from;
    while let Some(rel) = text.get(search..)?.find(key) {
        let at = search + rel;
        search = at + key.len();
        let before = &text[..at];
        let after = &text[at + key.len()..];
        let (start, after) = match before.chars().next_back() {
            Some(q @ ('"' | '\'')) => match after.strip_prefix(q) {
                Some(after) => (at - 1, after),
                None => continue,
            },
            _ => (at, after),
        };
        if !after.trim_start_matches([' ', '\t']).starts_with(':') {
            continue;
        }
        let line = &text[text[..start].rfind('\n').map_or(0, |n| n + 1)..start];
        let boundary = match line.chars().next_back() {
            None => true,
            Some(c) => !line_start && (c.is_whitespace() || c == '{' || c == ','),
        };
        if boundary && !in_comment(line) {
            return Some(start);
        }
    }
    None
}

/// Whether the text before a position on its line puts that position inside a comment.
pub fn in_comment(line: &str) -> bool {
    line.trim_start().starts_with('#') || line.contains(" #") || line.contains("\t#")
}

/// 1-based line and column (in characters) of byte offset `at`.
pub fn line_column(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_in_block_flow_and_json_and_never_in_comments() {
        let text = "# cpu: in a comment\nid: x\nresources: {cpu: 2}\n\"name\": \"n\"\n";
        assert_eq!(
            find_key(text, "cpu", 0, false).map(|at| line_column(text, at)),
            Some((3, 13))
        );
        assert_eq!(
            find_key(text, "id", 0, true).map(|at| line_column(text, at)),
            Some((2, 1))
        );
        assert_eq!(
            find_key(text, "name", 0, false).map(|at| line_column(text, at)),
            Some((4, 1))
        );
        assert_eq!(find_key(text, "missing", 0, false), None);
    }

    #[test]
    fn syntax_errors_move_the_position_out_of_the_message() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Doc {
            id: String,
        }
        let e = serde_yaml_ng::from_str::<Doc>("id: a\nnope: 1\n").unwrap_err();
        let s = syntax_error(&e);
        assert_eq!(s.location, Some((2, 1)));
        assert_eq!(s.key.as_deref(), Some("nope"));
        assert!(s.message.starts_with("unknown field `nope`"), "{}", s.message);
        assert!(!s.message.contains("line 2"), "{}", s.message);
    }
}
