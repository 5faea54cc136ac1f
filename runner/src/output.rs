//! How every subcommand's result is printed: the one rule behind `--output`.
//!
//! A command hands over [`Rows`] (its rows as JSON objects, its fixed columns and its table)
//! and this module alone decides what each format prints:
//!
//! | `--output` | stdout |
//! |---|---|
//! | `table` | for people: the command's own table, node-supplied text escaped ([`vogeler_proto::text`]) |
//! | `json`  | one document: the array of rows, or the one object the command is about |
//! | `jsonl` | one JSON object per row, one per line |
//! | `yaml`  | the json document, as YAML |
//! | `csv`   | a header of the command's columns, then one line per row: nested values as compact JSON, quoted as RFC 4180 says |
//!
//! JSON, YAML and CSV are data: values are exact and escaped as their format escapes, never
//! rewritten for a terminal. Notes beside the rows (more changes exist, what was stored) are
//! part of the table; with the data formats they go to stderr, so stdout holds data only.
//! A fan-out prints its replies as they arrive in jsonl and csv ([`Stream`]).

use serde::Serialize;
use serde_json::Value;

use crate::cli::Output;

/// One command's result in the shape every `--output` format is made from.
#[derive(Debug, Clone, PartialEq)]
pub struct Rows {
    /// CSV's header and the order of its cells. JSON rows keep every field they have;
    /// a column a row lacks is an empty cell.
    columns: Vec<String>,
    /// One JSON object per row.
    rows: Vec<Value>,
    /// What json and yaml print instead of the array of rows, when the command is about one
    /// thing: a fan-out's report, a stored document, a key just accepted.
    document: Option<Value>,
    /// The human form, already terminal-safe.
    table: String,
    /// Said in the table already; on stderr with the data formats.
    notes: Vec<String>,
}

/// What to print where.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Printed {
    pub stdout: String,
    pub stderr: String,
}

impl Rows {
    /// Many rows: json is their array.
    pub fn list(columns: &[&str], rows: Vec<Value>, table: String) -> Self {
        Self {
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows,
            document: None,
            table,
            notes: Vec::new(),
        }
    }

    /// One row: json is that object, csv a header and one line.
    pub fn object(columns: &[&str], row: Value, table: String) -> Self {
        Self::list(columns, vec![row.clone()], table).with_document(row)
    }

    /// Print `document` for json and yaml instead of the array of rows.
    pub fn with_document(mut self, document: Value) -> Self {
        self.document = Some(document);
        self
    }

    /// Columns known only from the data (a stored value's keys).
    pub fn with_columns(mut self, columns: Vec<String>) -> Self {
        self.columns = columns;
        self
    }

    /// A note the table already says, for stderr with the data formats.
    pub fn with_note(mut self, note: String) -> Self {
        self.notes.push(note);
        self
    }

    /// Everything `output` prints.
    pub fn render(&self, output: Output) -> Printed {
        Stream::new(output, self.columns.clone()).finish(self)
    }
}

/// Rows printed as they arrive (a fan-out's replies): jsonl and csv print each at once, csv's
/// header before the first; the other formats print everything at the end.
#[derive(Debug)]
pub struct Stream {
    output: Output,
    columns: Vec<String>,
    /// csv's header is out.
    started: bool,
}

impl Stream {
    pub fn new(output: Output, columns: Vec<String>) -> Self {
        Self {
            output,
            columns,
            started: false,
        }
    }

    /// The text for `row` now: its line (after csv's header, the first time), or nothing
    /// when `output` is printed whole by [`Stream::finish`].
    pub fn row(&mut self, row: &Value) -> String {
        match self.output {
            Output::Jsonl => format!("{row}\n"),
            Output::Csv => {
                let mut out = self.header();
                out.push_str(&csv_lines(std::iter::once(cells(&self.columns, row))));
                out
            }
            Output::Table | Output::Json | Output::Yaml => String::new(),
        }
    }

    /// csv's header, once.
    fn header(&mut self) -> String {
        if std::mem::replace(&mut self.started, true) {
            return String::new();
        }
        csv_lines(std::iter::once(self.columns.clone()))
    }

    /// The end: for jsonl and csv the rows of `rest` not streamed (and csv's header if no row
    /// came), for the other formats `rest` whole; its notes on stderr unless in the table.
    pub fn finish(mut self, rest: &Rows) -> Printed {
        let stdout = match self.output {
            Output::Table => rest.table.clone(),
            Output::Json | Output::Yaml => {
                let doc = rest
                    .document
                    .clone()
                    .unwrap_or_else(|| Value::Array(rest.rows.clone()));
                document(self.output, &doc)
            }
            Output::Jsonl | Output::Csv => {
                let mut out = match self.output {
                    Output::Csv => self.header(),
                    _ => String::new(),
                };
                for row in &rest.rows {
                    out.push_str(&self.row(row));
                }
                out
            }
        };
        let stderr = match self.output {
            Output::Table => String::new(),
            _ => rest
                .notes
                .iter()
                .map(|n| format!("vogeler-runner: {n}\n"))
                .collect(),
        };
        Printed { stdout, stderr }
    }
}

/// One document as json (pretty) or yaml.
fn document(output: Output, doc: &Value) -> String {
    match output {
        Output::Yaml => serde_yaml_ng::to_string(doc).unwrap_or_default(),
        _ => serde_json::to_string_pretty(doc).unwrap_or_default() + "\n",
    }
}

/// `row`'s cells in `columns` order: text as it is, nothing for null or a missing field,
/// numbers and booleans as JSON writes them, lists and objects as compact JSON.
fn cells(columns: &[String], row: &Value) -> Vec<String> {
    columns
        .iter()
        .map(|c| match row.get(c) {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        })
        .collect()
}

/// Records as CSV lines: fields with a comma, a quote or a line break quoted and their
/// quotes doubled (RFC 4180); lines end in `\n`, as Unix tools expect. Other control
/// characters are data and stay as they are.
fn csv_lines(records: impl Iterator<Item = Vec<String>>) -> String {
    let mut w = csv::WriterBuilder::new().from_writer(Vec::new());
    for record in records {
        // Writing to memory fails only for records of different lengths, and every record
        // has one cell per column.
        let _ = w.write_record(&record);
    }
    let bytes = w.into_inner().unwrap_or_default();
    String::from_utf8(bytes).unwrap_or_default()
}

/// Items as JSON rows.
pub fn rows_of<T: Serialize>(items: &[T]) -> Vec<Value> {
    items
        .iter()
        .map(|i| serde_json::to_value(i).unwrap_or_default())
        .collect()
}

/// A stored value as rows, for `show`: a list gives a row per entry (an object entry as it
/// is, anything else under `value`), an object a row per key (`key`, `value`), anything else
/// one row (`value`). The columns are the entries' keys in the order first seen.
pub fn value_rows(v: &Value) -> (Vec<String>, Vec<Value>) {
    let wrap = |v: &Value| serde_json::json!({ "value": v });
    let rows: Vec<Value> = match v {
        Value::Array(entries) => entries
            .iter()
            .map(|e| if e.is_object() { e.clone() } else { wrap(e) })
            .collect(),
        Value::Object(o) => o
            .iter()
            .map(|(k, v)| serde_json::json!({ "key": k, "value": v }))
            .collect(),
        other => vec![wrap(other)],
    };
    let mut columns: Vec<String> = match v {
        Value::Object(_) => vec!["key".into(), "value".into()],
        _ => Vec::new(),
    };
    for row in &rows {
        for k in row.as_object().into_iter().flat_map(|o| o.keys()) {
            if !columns.contains(k) {
                columns.push(k.clone());
            }
        }
    }
    if columns.is_empty() {
        columns.push("value".into());
    }
    (columns, rows)
}

/// What a command's `--help` ends with: its csv columns, from the same list its rows are
/// printed with, so the help cannot drift.
pub fn columns_help(columns: &[&str]) -> String {
    format!(
        "Columns (--output csv): {}. json, jsonl and yaml rows hold the same fields (some only when set).\n",
        columns.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A value with every character CSV and terminals care about.
    const NASTY: &str = "a,b \"q\"\nline2 \u{1b}[2J";

    fn rows() -> Rows {
        Rows::list(
            &["node", "value", "n"],
            vec![
                json!({"node": "web01", "value": NASTY, "n": 1}),
                json!({"node": "db01", "value": {"k": [1, "x,y"]}, "extra": true}),
            ],
            "the table\n".into(),
        )
        .with_note("more exist".into())
    }

    #[test]
    fn table_is_the_commands_own_and_notes_stay_in_it() {
        assert_eq!(
            rows().render(Output::Table),
            Printed {
                stdout: "the table\n".into(),
                stderr: String::new()
            }
        );
    }

    #[test]
    fn json_is_one_document_with_the_values_exact() {
        let p = rows().render(Output::Json);
        assert_eq!(
            p.stdout,
            concat!(
                "[\n",
                "  {\n",
                "    \"n\": 1,\n",
                "    \"node\": \"web01\",\n",
                "    \"value\": \"a,b \\\"q\\\"\\nline2 \\u001b[2J\"\n",
                "  },\n",
                "  {\n",
                "    \"extra\": true,\n",
                "    \"node\": \"db01\",\n",
                "    \"value\": {\n",
                "      \"k\": [\n",
                "        1,\n",
                "        \"x,y\"\n",
                "      ]\n",
                "    }\n",
                "  }\n",
                "]\n",
            )
        );
        assert_eq!(p.stderr, "vogeler-runner: more exist\n");
        let back: Value = serde_json::from_str(&p.stdout).expect("json");
        assert_eq!(back[0]["value"], NASTY);
    }

    #[test]
    fn jsonl_is_one_object_per_row_per_line() {
        let p = rows().render(Output::Jsonl);
        assert_eq!(
            p.stdout,
            concat!(
                "{\"n\":1,\"node\":\"web01\",\"value\":\"a,b \\\"q\\\"\\nline2 \\u001b[2J\"}\n",
                "{\"extra\":true,\"node\":\"db01\",\"value\":{\"k\":[1,\"x,y\"]}}\n",
            )
        );
        assert_eq!(p.stderr, "vogeler-runner: more exist\n");
    }

    #[test]
    fn yaml_is_the_json_document() {
        let p = rows().render(Output::Yaml);
        assert_eq!(
            p.stdout,
            concat!(
                "- n: 1\n",
                "  node: web01\n",
                "  value: \"a,b \\\"q\\\"\\nline2 \\e[2J\"\n",
                "- extra: true\n",
                "  node: db01\n",
                "  value:\n",
                "    k:\n",
                "    - 1\n",
                "    - x,y\n",
            )
        );
        let back: Value = serde_yaml_ng::from_str(&p.stdout).expect("yaml");
        assert_eq!(
            back,
            serde_json::from_str::<Value>(&rows().render(Output::Json).stdout).expect("json")
        );
    }

    #[test]
    fn csv_quotes_as_rfc_4180_and_nests_as_compact_json() {
        let p = rows().render(Output::Csv);
        assert_eq!(
            p.stdout,
            concat!(
                "node,value,n\n",
                "web01,\"a,b \"\"q\"\"\nline2 \u{1b}[2J\",1\n",
                "db01,\"{\"\"k\"\":[1,\"\"x,y\"\"]}\",\n",
            )
        );
        assert_eq!(p.stderr, "vogeler-runner: more exist\n");
        // It reads back cell for cell.
        let mut r = csv::Reader::from_reader(p.stdout.as_bytes());
        let back: Vec<Vec<String>> = r
            .records()
            .map(|rec| rec.expect("record").iter().map(str::to_string).collect())
            .collect();
        assert_eq!(back[0], ["web01", NASTY, "1"]);
        assert_eq!(back[1], ["db01", "{\"k\":[1,\"x,y\"]}", ""]);
    }

    #[test]
    fn no_rows_is_an_empty_array_and_a_bare_header() {
        let none = Rows::list(&["node"], vec![], "nothing\n".into());
        assert_eq!(none.render(Output::Json).stdout, "[]\n");
        assert_eq!(none.render(Output::Yaml).stdout, "[]\n");
        assert_eq!(none.render(Output::Jsonl).stdout, "");
        assert_eq!(none.render(Output::Csv).stdout, "node\n");
    }

    #[test]
    fn one_object_is_the_document_and_one_row() {
        let row = json!({"node": "web01", "key_id": "abc"});
        let one = Rows::object(&["node", "key_id"], row.clone(), "accepted\n".into());
        let json: Value = serde_json::from_str(&one.render(Output::Json).stdout).expect("json");
        assert_eq!(json, row);
        assert_eq!(
            one.render(Output::Jsonl).stdout,
            "{\"key_id\":\"abc\",\"node\":\"web01\"}\n"
        );
        assert_eq!(one.render(Output::Csv).stdout, "node,key_id\nweb01,abc\n");
    }

    #[test]
    fn a_stream_prints_rows_as_they_come_and_the_rest_at_the_end() {
        let cols = || vec!["node".to_string(), "status".to_string()];
        let first = json!({"node": "a", "status": "ok"});
        let rest = Rows::list(
            &["node", "status"],
            vec![json!({"node": "b", "status": "no_response"})],
            "table\n".into(),
        )
        .with_document(json!({"summary": 1}));

        let mut csv = Stream::new(Output::Csv, cols());
        assert_eq!(csv.row(&first), "node,status\na,ok\n");
        assert_eq!(csv.finish(&rest).stdout, "b,no_response\n");
        let quiet = Stream::new(Output::Csv, cols());
        assert_eq!(quiet.finish(&rest).stdout, "node,status\nb,no_response\n");

        let mut jsonl = Stream::new(Output::Jsonl, cols());
        assert_eq!(jsonl.row(&first), "{\"node\":\"a\",\"status\":\"ok\"}\n");
        assert_eq!(
            jsonl.finish(&rest).stdout,
            "{\"node\":\"b\",\"status\":\"no_response\"}\n"
        );

        for whole in [Output::Table, Output::Json, Output::Yaml] {
            let mut s = Stream::new(whole, cols());
            assert_eq!(s.row(&first), "", "{whole:?} prints at the end");
            assert_eq!(s.finish(&rest), rest.render(whole));
        }
        assert_eq!(rest.render(Output::Json).stdout, "{\n  \"summary\": 1\n}\n");
    }

    #[test]
    fn stored_values_become_rows() {
        let (cols, rows) = value_rows(&json!([
            {"name": "bash", "version": "5.2"},
            {"name": "zsh", "arch": "amd64"},
            "odd"
        ]));
        assert_eq!(cols, ["name", "version", "arch", "value"]);
        assert_eq!(rows[2], json!({"value": "odd"}));
        let (cols, rows) = value_rows(&json!({"os": {"family": "Debian"}, "cpus": 2}));
        assert_eq!(cols, ["key", "value"]);
        assert_eq!(rows[1], json!({"key": "os", "value": {"family": "Debian"}}));
        let (cols, rows) = value_rows(&json!("6.1.0"));
        assert_eq!(
            (cols, rows),
            (vec!["value".to_string()], vec![json!({"value": "6.1.0"})])
        );
        let (cols, rows) = value_rows(&json!([]));
        assert_eq!((cols, rows.len()), (vec!["value".to_string()], 0));
    }
}
