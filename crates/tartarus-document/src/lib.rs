//! Positions in configuration documents (templates, policies) written as YAML or JSON, so that every error
//! can say `file:line:column: message` and name the offending key.
//!
//! serde_yaml_ng reports where parsing failed but keeps no positions in parsed values, so errors found after
//! parsing (a bad value, a contradiction) are located by searching the text for the key's path:
//! [`find_key`] finds a mapping key (block `key:`, flow `{key: …}` or quoted JSON `"key":`), skipping
//! comments; [`line_column`] turns an offset into 1-based line and column.
//!
//! Documents come from API callers, so parsing is bounded before the parser sees the text: [`parse`]
//! refuses nesting deeper than [`MAX_DEPTH`] levels (found by [`too_deep`], one linear pass), because the
//! YAML scanner's work grows with the square of the nesting depth and one 1 MiB body of brackets would keep
//! a thread busy for minutes.

/// The deepest nesting [`parse`] accepts: block levels (indentation, `- `, `? `) plus flow levels (`[`, `{`).
/// Templates and policies need a handful.
pub const MAX_DEPTH: usize = 64;

/// Parses `text` (YAML or JSON) from `file` into `T`, after checking its nesting depth.
pub fn parse<T: serde::de::DeserializeOwned>(text: &str, file: &str) -> Result<T, DocumentError> {
    if let Some(at) = too_deep(text, MAX_DEPTH) {
        return Err(DocumentError {
            file: file.to_string(),
            location: Some(line_column(text, at)),
            key: None,
            message: format!("the document nests deeper than {MAX_DEPTH} levels"),
        });
    }
    serde_yaml_ng::from_str(text).map_err(|e| DocumentError::from_yaml(&e, file))
}

/// Where a scan of YAML text stands: expecting a node, inside a plain scalar, or after a complete node
/// (a quoted scalar, a closed flow collection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    Node,
    Plain,
    After,
}

/// The byte offset at which the nesting of `text` first exceeds `max` levels, if it does: one pass, no
/// allocation beyond the stack of open block indentations.
///
/// It follows YAML's tokens as far as nesting depends on them (quoted scalars, comments, block scalars,
/// plain scalars that span lines, flow collections only where a node starts in block context) and counts
/// generously where that is cheaper: every indentation level and every `- ` or `? ` is a level, so a real
/// document's depth is at most counted twice. Text that is not YAML may be counted in any way: the parser
/// refuses it before nesting into it.
pub fn too_deep(text: &str, max: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    // Indentation columns of the open block nodes.
    let mut block: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    let mut quote: Option<u8> = None;
    let mut at = At::Node;
    // A plain scalar in block context, begun on a line indented this much: more indented lines continue it.
    let mut plain_indent: Option<usize> = None;
    // Inside a block scalar (`|`, `>`) whose header is on a line indented this much.
    let mut literal: Option<usize> = None;
    let blank = |b: Option<&u8>| matches!(b, None | Some(b' ' | b'\t' | b'\r'));
    let mut start = 0;
    while start < bytes.len() {
        let end = bytes[start..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(bytes.len(), |n| start + n);
        let line = &bytes[start..end];
        let next_line = end + 1;
        let indent = line.iter().take_while(|&&b| b == b' ').count();
        let empty = line[indent..].iter().all(|&b| matches!(b, b' ' | b'\t' | b'\r'));
        if let Some(header) = literal {
            if empty || indent > header {
                start = next_line;
                continue;
            }
            literal = None;
        }
        let mut j = indent;
        if quote.is_none() && flow == 0 {
            if empty || line[indent] == b'#' {
                start = next_line;
                continue;
            }
            if plain_indent.is_some_and(|p| indent > p) {
                at = At::Plain;
            } else {
                plain_indent = None;
                at = At::Node;
                if indent == 0 && (line.starts_with(b"---") || line.starts_with(b"...")) && blank(line.get(3))
                {
                    block.clear();
                    j = 3;
                } else {
                    while block.last().is_some_and(|&top| top >= indent) {
                        block.pop();
                    }
                    block.push(indent);
                }
                // Compact nesting: `- - - x`, `? - x`.
                while matches!(line.get(j), Some(b'-' | b'?' | b':')) && blank(line.get(j + 1)) {
                    block.push(j);
                    j += 1;
                    while matches!(line.get(j), Some(b' ' | b'\t')) {
                        j += 1;
                    }
                }
                if block.len() > max {
                    return Some(start + j.min(line.len()));
                }
            }
        }
        while j < line.len() {
            let c = line[j];
            if let Some(q) = quote {
                match c {
                    b'\\' if q == b'"' => j += 1,
                    b'\'' if q == b'\'' && line.get(j + 1) == Some(&b'\'') => j += 1,
                    _ if c == q => {
                        quote = None;
                        at = At::After;
                    }
                    _ => {}
                }
                j += 1;
                continue;
            }
            if c == b'#' && (j == 0 || blank(line.get(j - 1))) {
                break;
            }
            let next = line.get(j + 1);
            match (flow > 0, at, c) {
                (_, _, b' ' | b'\t' | b'\r') => {}
                (true, _, b'[' | b'{') | (false, At::Node, b'[' | b'{') => {
                    flow += 1;
                    if block.len() + flow > max {
                        return Some(start + j);
                    }
                    at = At::Node;
                }
                (true, _, b']' | b'}') => {
                    flow -= 1;
                    at = At::After;
                }
                (true, _, b',') => at = At::Node,
                (true, At::Node | At::After, b':') => at = At::Node,
                (true, At::Plain, b':')
                    if blank(next) || matches!(next, Some(b',' | b'[' | b']' | b'{' | b'}')) =>
                {
                    at = At::Node
                }
                (_, At::Node, b'"' | b'\'') => quote = Some(c),
                (_, At::Node, b'&' | b'!') => {
                    // An anchor or a tag: the node follows it.
                    while j + 1 < line.len()
                        && !matches!(line[j + 1], b' ' | b'\t' | b',' | b'[' | b']' | b'{' | b'}')
                    {
                        j += 1;
                    }
                }
                (false, At::Node, b'|' | b'>') => {
                    literal = Some(indent);
                    break;
                }
                (true, At::Node, _) => at = At::Plain,
                (false, At::Node, _) => {
                    at = At::Plain;
                    plain_indent.get_or_insert(indent);
                }
                (false, At::Plain | At::After, b':') if blank(next) => {
                    at = At::Node;
                    plain_indent = None;
                }
                _ => {}
            }
            j += 1;
        }
        start = next_line;
    }
    None
}

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
        // A quoted key starts at its quote: one that opens before `from` is not "at or after" it, and
        // returning it would hand a caller that searches on from `found + 1` the same key forever.
        if start < from {
            continue;
        }
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

/// 1-based line and column (in characters) of byte offset `at`, counting line breaks as the YAML parser
/// does (`\r\n`, a lone `\r`, `\n`, NEL, LS and PS), so that a position found here and one the parser
/// reports number the same lines.
pub fn line_column(text: &str, at: usize) -> (usize, usize) {
    let (mut line, mut column) = (1, 1);
    let mut chars = text[..at].chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            // One break with the `\n` that follows.
            '\r' if chars.peek() == Some(&'\n') => {}
            '\r' | '\n' | '\u{85}' | '\u{2028}' | '\u{2029}' => (line, column) = (line + 1, 1),
            _ => column += 1,
        }
    }
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_find_key_never_returns_a_quoted_key_that_opens_before_from() {
        let text = "{\"id\": \"a\", \"x\": {\"id\": \"b\"}}";
        assert_eq!(find_key(text, "id", 0, false), Some(1));
        // From inside the first quoted key: the next one, not the first again.
        assert_eq!(find_key(text, "id", 2, false), text.rfind("\"id\""));
    }

    #[test]
    fn test_line_column_counts_the_line_breaks_the_parser_counts() {
        let text = "a\rb\r\nc\u{2028}d\u{85}é\ne";
        assert_eq!(line_column(text, text.find('b').unwrap()), (2, 1));
        assert_eq!(line_column(text, text.find('c').unwrap()), (3, 1));
        assert_eq!(line_column(text, text.find('d').unwrap()), (4, 1));
        assert_eq!(line_column(text, text.find('e').unwrap()), (6, 1));
        assert_eq!(line_column(text, text.len()), (6, 2));
        assert_eq!(line_column("é\r\nx", "é\r\n".len()), (2, 1));
    }

    #[test]
    fn test_a_key_located_in_text_with_lone_carriage_returns_is_where_the_parser_says() {
        // Found by the documents fuzz target: lone `\r`s are YAML line breaks, and the parser's line
        // numbers (here of an unknown key) ran past the lines `line_column` counted.
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Doc {
            id: String,
        }
        let text = "id: x\r\rextra: 1\r";
        let err = parse::<Doc>(text, "d.yaml").unwrap_err();
        let at = find_key(text, "extra", 0, false).unwrap();
        assert_eq!(err.location, Some(line_column(text, at)), "{err}");
    }

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

    /// The nesting `too_deep` finds: the first `max` at which it reports nothing.
    fn depth(text: &str) -> usize {
        (0..).find(|&max| too_deep(text, max).is_none()).unwrap()
    }

    #[test]
    fn nesting_is_counted_in_flow_and_block_context() {
        assert_eq!(depth("a: 1\n"), 1);
        assert_eq!(depth("a: [[1], {b: [2]}]\n"), 4);
        assert_eq!(depth("a:\n  b:\n    c: 1\n"), 3);
        assert_eq!(depth("- - - x\n"), 4);
        assert_eq!(depth("{\"a\": [[[1]]]}"), 5);
        let brackets = format!("env: {}{}\n", "[".repeat(1000), "]".repeat(1000));
        assert_eq!(too_deep(&brackets, MAX_DEPTH), Some(4 + MAX_DEPTH));
    }

    #[test]
    fn brackets_in_scalars_comments_and_block_scalars_are_text() {
        assert_eq!(depth("a: \"[[[[\"\nb: '{{{{'\n"), 1);
        assert_eq!(depth("a: echo [[[[ x\n# [[[[[\nb: 1 # [[[[\n"), 1);
        assert_eq!(depth("a: |\n  [[[[[[\n  {{{{\nb: 1\n"), 1);
        assert_eq!(depth("a: [\"]]]]\", 'it''s ]]', x'y]\n"), 2);
        assert_eq!(depth("a: b\n  \"continued\nc: [[1]]\n"), 3);
        assert_eq!(depth("a: [&x \"]]]\", *x, !!str \"]\"]\n"), 2);
    }

    #[test]
    fn parse_refuses_deep_documents_before_parsing_with_their_position() {
        let text = format!("id: d\nenv: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
        let started = std::time::Instant::now();
        let e = parse::<serde_yaml_ng::Value>(&text, "deep.yaml").unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert_eq!(e.location, Some((2, 5 + MAX_DEPTH)));
        assert_eq!(
            e.to_string(),
            format!(
                "deep.yaml:2:{}: the document nests deeper than 64 levels",
                5 + MAX_DEPTH
            )
        );
        assert!(parse::<serde_yaml_ng::Value>("a: [[1]]\n", "ok.yaml").is_ok());
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
