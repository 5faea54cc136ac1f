//! One expression language over stored node documents: which nodes run a command (`-n`) and
//! which nodes a query returns. It is a strict superset of the runner's node sets
//! (`runner/src/target.rs`), and it reaches every stored plugin value, not only announced facts.
//!
//! ```text
//! all                                      every node document
//! web01   web01,web02   web*   db-[0-9]*   node names, lists, globs over node names
//! @nodes.txt   -                           names from a file or stdin (read by the caller)
//! os.family=Debian   kernel=~^6\.          announced facts, as node sets always did
//! memory_mb>16000   memory_mb > 16000      spaces around operators are optional
//! facts.memory_mb < 4096                   a plugin's value, by path
//! os_release.VERSION_ID = 12
//! disks[].use_percent > 90                 `[]`: any element of a list
//! exists os_release.VERSION_ID
//! dpkg has openssl < 3.0.13                a package, in dpkg's (or rpm's) own version order
//! dpkg has name=nginx and version=~^1\.22  conditions on one element of a list
//! disks has (target = / and use_percent > 90)
//! web* and not (os.family=RedHat or kernel=~^5)
//! ```
//!
//! [`parse`] turns text into an [`Expr`]; [`Expr::matches`] decides one node from its whole
//! document; [`Expr::mango`] is a CouchDB `_find` selector that keeps at least every node
//! `matches` would keep (usually far fewer than all), and [`Expr::fields`] the document fields
//! `matches` needs, so a caller reads only those fields of only those documents and refines
//! with `matches`. Nothing here does I/O: `@file` and `-` stay [`Source`]s until the caller
//! reads them with [`Expr::resolve_sources`].
//!
//! # Grammar
//!
//! ```text
//! expr       = or ;
//! or         = and { "or" and } ;
//! and        = unary { "and" unary } ;
//! unary      = "not" unary | primary ;
//! primary    = "(" expr ")" | "all" | "exists" path | "@" FILE | "-"
//!            | path OP value | path "has" member | names ;
//! names      = NAME { "," NAME } | GLOB ;
//! member     = "(" cond ")"                            (any conditions on one element)
//!            | FIELD OP value { "and" FIELD OP value } (FIELD: name version arch status
//!                                                       epoch release)
//!            | PACKAGE [ OP value ] ;                  (package shorthand)
//! cond       = cand { "or" cand } ;   cand = cunary { "and" cunary } ;
//! cunary     = "not" cunary | "(" cond ")" | "exists" path | path OP value ;
//! path       = [ "." ] KEY { "[]" } { "." KEY { "[]" } } ;
//! OP         = "=" | "!=" | "=~" | "!~" | "<" | "<=" | ">" | ">=" ;
//! value      = 'text' | "text" | BARE ;
//! ```
//!
//! `not` binds tighter than `and`, `and` tighter than `or`. `and`, `or` and `not` are reserved;
//! `all`, `exists` and `has` are keywords only where the grammar above puts them (a node named
//! `exists` is still `-n exists`).
//!
//! Lexing follows the node-set tokenizer so every node set keeps its meaning. A word (a name,
//! glob or path) ends at white space, a parenthesis, a quote or an operator. A bare value ends
//! at white space or at a `)` that closes nothing inside the value, so `kernel=~^(5|6\.8)` keeps
//! its regex group and `(os.family=Debian)` its grouping. Quoted values take anything; a quote
//! inside is doubled (`'it''s'`); backslashes are kept as written, so `'^1\.22'` is a regex.
//! Without quotes, a value after an operator with a space before it may not be `and` or `or`
//! (`os.family = and` is a mistake far more often than a value).
//!
//! # How far `has` reaches
//!
//! `PLUGIN has (…)` takes any conditions on one element, with `and`, `or`, `not`, and paths
//! relative to the element. Without parentheses, `has` reads either the package shorthand
//! (`has openssl`, `has openssl < 3.0.13`: an element named so, whose version meets the
//! bound), or, when the word after `has` is a package record's field (`name`, `version`,
//! `arch`, `status`, `epoch`, `release`) followed by an operator, conditions on those fields
//! joined by `and`: `dpkg has name=nginx and version=~^1\.22` is one element with both. The
//! first `and` followed by anything else ends them, so `dpkg has name=nginx and
//! os.family=Debian` asks the node's facts for the family. Write parentheses for anything
//! else: `(dpkg has name=nginx) and arch=amd64` for the node's architecture,
//! `dpkg has (name=nginx or name=apache2)` for either.
//!
//! # Paths, and where they resolve
//!
//! The issue's examples put announced facts (`os.family`, `kernel`, `memory_mb`) and plugin
//! values (`facts.memory_mb`, `os_release.VERSION_ID`, `disks[]…`) in the same syntax, and no
//! rule decidable from the text alone tells them apart: both are open sets (operators announce
//! their own facts through `[agent.facts]`, and plugins are drop-in files), and they overlap
//! (the shipped `kernel` plugin stores `uname -srm`, the `kernel` fact the release only). So a
//! bare path resolves per document, **announced facts first**:
//!
//! - if the node's announced facts (`vogeler.facts`) have the path's first key, the path is
//!   read there: `kernel=~^6\.` keeps meaning the announced kernel release on a node that also
//!   runs the `kernel` plugin, as every node set today expects;
//! - otherwise it is read from the document's top level, where plugin values live:
//!   `facts.memory_mb`, `os_release.VERSION_ID`, `dpkg has …`.
//!
//! Facts first, not plugins first, because the shipped plugins already shadow facts (`kernel`)
//! and node sets must not change meaning when a node starts running a plugin. Two spellings
//! decide at parse time when the per-document rule is not wanted: a leading `.` reads the
//! document only (`.kernel =~ Linux` is the `kernel` plugin's value), and a path starting with
//! `vogeler` is always the document's bookkeeping (`vogeler.facts.kernel` is the announced fact
//! only; no plugin may be named `vogeler`). In CouchDB the rule becomes
//! `{"$or": [{"vogeler.facts.P": C}, {"P": C}]}`, a superset that [`Expr::matches`] refines.
//!
//! # Comparisons
//!
//! - `=`, `!=`: a stored number equals a value that reads as the same number (`memory_mb =
//!   16000` matches `16000` and `16000.0`); anything else compares as text, a string as written
//!   (`VERSION_ID = 12` matches `"12"`, not `"12.0"`), `true`/`null` as their JSON.
//!   Comparing stored strings as text is what keeps equality exact in CouchDB.
//! - A comparison reads one value: a list or an object at the path matches no comparison
//!   (`disks[].use_percent` compares a list's elements, `has` its records), which is also
//!   what the values view holds ([`crate::design::VALUES`]).
//! - `<`, `<=`, `>`, `>=` with a value that reads as a number compare numerically with stored
//!   numbers and with strings that read as numbers (`"16000"`); any other stored value does not
//!   match (it is neither more nor less than a number), as in node sets. With any other value
//!   they compare text byte by byte.
//! - `=~`, `!~`: a regex ([`regex`] syntax, searched anywhere unless anchored) over the text.
//! - `!=` and `!~` need the value to be there: a node without `os.family` is in neither
//!   `os.family=Debian` nor `os.family!=Debian`, but it is in `not os.family=Debian`.
//! - A path through `[]` matches when any element does; `not` around it means "no element".
//! - "Reads as a number": an optional sign, digits with an optional `.`, an optional exponent
//!   (`12`, `-0.5`, `1e3`); not `inf`, `nan` or hexadecimal.
//!
//! # Packages
//!
//! Plugins named in a [`Catalog`] are package inventories (`dpkg` with dpkg's order, `rpms`
//! with rpm's, by default). Inside their `has`, the version (`has openssl < 3.0.13`, or the
//! field `version` in conditions) follows [`crate::version`]: dpkg's order for dpkg, and rpm's
//! own matching rule ([`crate::version::satisfies`]) for rpm, so `3.0.13-1.el9` meets
//! `= 3.0.13`. A record's version is `epoch:version-release` when it has `epoch` and `release`
//! fields (rpm's `(none)` epoch counts as none). An element whose `status` is set to anything
//! but `installed` (dpkg's `config-files`) is not installed and does not count, unless the
//! conditions ask about `status` themselves. In any other plugin, `has NAME` finds an element
//! whose `name` is NAME, or a plain string element equal to it (`hello has alpha`), and values
//! compare as above. `PLUGIN has …` on a package inventory reads the plugin's own value,
//! never an announced fact of the same name: facts are not package lists, and the packages
//! view ([`crate::design::PACKAGES`]) indexes plugin values.
//!
//! # Narrowing in CouchDB
//!
//! [`Expr::mango`] never leaves out a node [`Expr::matches`] accepts (a property test checks
//! this against a model of CouchDB's matcher). What CouchDB decides exactly, and what `matches`
//! refines:
//!
//! | construct                       | selector                                          | |
//! |---------------------------------|---------------------------------------------------|---------|
//! | `all`                           | `{}`                                              | exact   |
//! | `web01,web02`                   | `{"_id": {"$in": [..]}}`                          | exact   |
//! | `web*`                          | `{"_id": {"$regex": "^web"}}` (literal prefix)    | refined |
//! | `@file`, `-` unread             | matches nothing                                   | exact   |
//! | bare path `P`                   | `{"$or": [{"vogeler.facts.P": C}, {"P": C}]}`      | refined |
//! | `.P`, `vogeler.P`               | `{"P": C}`                                        | as `C`  |
//! | `a[].b`                         | `{"a": {"$elemMatch": {"b": C}}}`                 | as `C`  |
//! | `= v`                           | `C = {"$in": ["v", v as number, true/false/null]}` | exact for scalars; lists refined |
//! | `= huge number`, `= [..]`       | `$in` or `{"$type": ..}`                          | refined |
//! | `> n`, `>= n`                   | `{"$gt": n}` (every string sorts after numbers)   | refined |
//! | `< n`, `<= n`                   | `$or` of `{"$lt": n}`, strings that look numeric  | refined |
//! | `< word`, `> word`              | `{"$exists": true}` (CouchDB sorts strings by ICU)| refined |
//! | `=~ re`                         | `$or` of `{"$regex": prefix literals}`, non-strings | refined |
//! | `!=`, `!~`                      | `{"$exists": true}` (ICU may call distinct strings equal) | refined |
//! | `exists P`                      | `{"P": {"$exists": true}}`                        | exact   |
//! | `P has NAME [OP V]`             | `{"P": {"$elemMatch": {"name": ..}}}` (or the string) | refined |
//! | `has (..)`, `version` field     | `{"$elemMatch": ..}`, version `{"$exists": true}` | refined |
//! | `and`, `or`                     | `$and`, `$or`                                     | as parts|
//! | `not` names / `not all`         | `{"_id": {"$nin": [..]}}` / nothing               | exact   |
//! | `not` anything else             | `{}`, De Morgan through `and`/`or`                | refined |
//!
//! Versions are never narrowed: equal versions have many spellings (`1.0`, `0:1.0`, `1.0-0`)
//! and orders are the package managers', not CouchDB's; the package name narrows instead.
//! Numbers are narrowed only below 2^53, where JSON numbers and `f64` agree. `not` is pushed
//! through `and`/`or` by De Morgan but otherwise gives up: CouchDB's `$not` fails on a missing
//! field, where `not` matches. The installed-status rule is left to `matches` (CouchDB does not
//! know the catalog). The caller adds its own "is a node document" condition (the database also
//! holds `fresh:` documents) and asks for [`Expr::fields`] plus `_id`.
//!
//! # Limits
//!
//! Expressions come from operators, values from nodes. An expression is at most
//! [`MAX_EXPR_BYTES`] long and nests at most [`MAX_EXPR_DEPTH`] levels (parentheses, `not`,
//! `has`), so parsing, evaluation and dropping never recurse deeply; long `and`/`or` chains are
//! flat lists. A path has at most [`MAX_PATH_STEPS`] parts. Regexes are compiled once, with a
//! size limit, and [`regex`] matches in linear time over any node value.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use regex::{Regex, RegexBuilder};
use serde_json::{Map, Value, json};

use crate::{
    names::{NameError, NodeName, RESERVED_PLUGIN_NAME},
    version::{self, Scheme},
};

/// Longest expression accepted, in bytes: far beyond anything typed, small enough that no
/// input can make the parser or a selector large.
pub const MAX_EXPR_BYTES: usize = 64 * 1024;
/// Deepest nesting of parentheses, `not` and `has`: each level is a stack frame of the parser,
/// the evaluator, the narrowing and `Drop`.
pub const MAX_EXPR_DEPTH: usize = 64;
/// Most parts (keys and `[]`) in one path.
pub const MAX_PATH_STEPS: usize = 32;
/// Bound on a compiled regex (and its lazy DFA), so one expression cannot take unbounded memory.
const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Fields of package records that start conditions after an unparenthesized `has`.
const RECORD_FIELDS: &[&str] = &["name", "version", "arch", "status", "epoch", "release"];
/// Largest magnitude below which every integer is an `f64`: numbers are narrowed in CouchDB
/// only below it, where CouchDB's exact comparison and ours agree.
const EXACT_F64: f64 = 9_007_199_254_740_992.0;
/// A PCRE (CouchDB's `$regex`) for every string [`parse_number`] accepts (and a few more).
const NUMBER_REGEX: &str = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$";

/// A parsed expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// Every node document.
    All,
    /// Names given explicitly; the runner commands these even when no document knows them.
    Names(BTreeSet<NodeName>),
    /// A glob over node names.
    Glob(glob::Pattern),
    /// Names still to be read; matches nothing until [`Expr::resolve_sources`] replaces it.
    NamesFrom(Source),
    /// A value at a path compared with one from the expression.
    Compare {
        path: Path,
        test: Test,
    },
    /// A value is stored at the path.
    Exists(Path),
    /// A list at the path has an element that meets `member`.
    Has {
        path: Path,
        member: Member,
    },
    And(Vec<Expr>),
    Or(Vec<Expr>),
    Not(Box<Expr>),
}

/// Where `@file` and `-` read names from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(String),
    Stdin,
}

/// A path into a document, such as `os.family` or `disks[].use_percent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    pub root: Root,
    /// Never empty: a path starts with a key.
    pub steps: Vec<Step>,
}

/// Where a path starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Root {
    /// Announced facts when they have the first key, else the document (plugin values).
    Auto,
    /// The document only: `.kernel`, and every path starting with `vogeler`.
    Document,
    /// One element of a list, inside `has`.
    Element,
}

/// One part of a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Key(String),
    /// `[]`: any element of a list.
    Each,
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Match,
    NotMatch,
    Lt,
    Le,
    Gt,
    Ge,
}

/// An operator and the value on its right, prepared once: read as a number when it is one,
/// compiled when it is a regex.
#[derive(Debug, Clone)]
pub struct Test {
    op: Op,
    value: String,
    number: Option<f64>,
    regex: Option<Regex>,
}

/// What an element of a list must be, in `has`.
#[derive(Debug, Clone, PartialEq)]
pub enum Member {
    /// `has openssl < 3.0.13`: an element named so (or a string equal to the name), with a
    /// version meeting the bound.
    Package { name: String, bound: Option<Test> },
    /// `has (name=nginx and version=~^1\.22)`: conditions on one element.
    Where(Cond),
}

/// A condition on one element of a list, with paths relative to the element.
#[derive(Debug, Clone, PartialEq)]
pub enum Cond {
    Compare { path: Path, test: Test },
    Exists(Path),
    And(Vec<Cond>),
    Or(Vec<Cond>),
    Not(Box<Cond>),
}

/// Which plugins are package inventories, and whose version order their versions follow.
/// Declared plugins can be added with [`Catalog::with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalog {
    packages: BTreeMap<String, Scheme>,
}

/// Why an expression was refused: what was expected, where, and what was there instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based, in characters: the start of the offending token, or one past the end.
    pub column: usize,
    pub message: String,
    /// The token found there, quoted; `None` at the end of the expression.
    pub found: Option<String>,
}

/// Why `@file` or `-` could not be turned into names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// The caller's reader failed; its message is kept as it is.
    #[error("{0}")]
    Read(String),
    #[error("{origin}: {error}")]
    BadName { origin: String, error: NameError },
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at column {}", self.message, self.column)?;
        if let Some(found) = &self.found {
            write!(f, ", found {found}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ParseError {}

impl PartialEq for Test {
    /// Two tests are equal when they were written the same (the regex follows from the text).
    fn eq(&self, other: &Self) -> bool {
        self.op == other.op && self.value == other.value
    }
}

impl Default for Catalog {
    /// The package plugins Vogeler ships: `dpkg` (dpkg's order) and `rpms` (rpm's).
    fn default() -> Self {
        version::BY_NAME
            .iter()
            .fold(Self::none(), |c, (plugin, scheme)| c.with(*plugin, *scheme))
    }
}

impl Catalog {
    /// No package plugins: every `has` compares versions as plain values.
    pub fn none() -> Self {
        Self {
            packages: BTreeMap::new(),
        }
    }
    /// Declare `plugin` a package inventory whose versions follow `scheme`.
    pub fn with(mut self, plugin: impl Into<String>, scheme: Scheme) -> Self {
        self.packages.insert(plugin.into(), scheme);
        self
    }
    pub fn scheme(&self, plugin: &str) -> Option<Scheme> {
        self.packages.get(plugin).copied()
    }
    /// The package inventories of one node document: the built-in ones, and those its node
    /// declared (`vogeler.packages`), which cannot reorder a built-in.
    pub fn of_document(doc: &Value) -> Self {
        let mut catalog = Self::default();
        if let Some(declared) = doc
            .get(RESERVED_PLUGIN_NAME)
            .and_then(|v| v.get("packages"))
            .and_then(Value::as_object)
        {
            for (plugin, s) in declared {
                if Scheme::by_name(plugin).is_none()
                    && let Some(s) = s.as_str().and_then(|s| s.parse().ok())
                {
                    catalog = catalog.with(plugin.clone(), s);
                }
            }
        }
        catalog
    }
}

// ----------------------------------------------------------------------------------------------
// Parsing
// ----------------------------------------------------------------------------------------------

/// Parse an expression (see the module documentation for the grammar).
pub fn parse(s: &str) -> Result<Expr, ParseError> {
    if s.len() > MAX_EXPR_BYTES {
        return Err(ParseError {
            column: 1,
            message: format!(
                "the expression is {} bytes long, more than the {MAX_EXPR_BYTES} allowed",
                s.len()
            ),
            found: None,
        });
    }
    let mut p = Parser {
        s: s.chars().collect(),
        at: 0,
        depth: 0,
    };
    let expr = p.or()?;
    p.skip_ws();
    if p.at < p.s.len() {
        return Err(p.error(p.at, "expected \"and\", \"or\" or the end"));
    }
    Ok(expr)
}

const TERM: &str = "expected a node name, a glob, \"all\" or a condition";

const OPS: &[(&str, Op)] = &[
    ("=~", Op::Match),
    ("!~", Op::NotMatch),
    ("!=", Op::Ne),
    (">=", Op::Ge),
    ("<=", Op::Le),
    ("=", Op::Eq),
    (">", Op::Gt),
    ("<", Op::Lt),
];

struct Parser {
    s: Vec<char>,
    at: usize,
    depth: usize,
}

fn op_at(s: &[char], i: usize) -> Option<(Op, usize)> {
    OPS.iter().find_map(|(text, op)| {
        let n = text.chars().count();
        (s.len() >= i + n && s[i..i + n].iter().copied().eq(text.chars())).then_some((*op, n))
    })
}

/// Where a word (name, glob, path, package) stops.
fn ends_word(s: &[char], i: usize) -> bool {
    match s.get(i) {
        None => true,
        Some(c) if c.is_whitespace() => true,
        Some('(' | ')' | '\'' | '"') => true,
        Some(_) => op_at(s, i).is_some(),
    }
}

fn is_reserved(w: &str) -> bool {
    matches!(w, "and" | "or" | "not" | "has")
}

impl Parser {
    fn skip_ws(&mut self) {
        while self.s.get(self.at).is_some_and(|c| c.is_whitespace()) {
            self.at += 1;
        }
    }
    fn peek(&self) -> Option<char> {
        self.s.get(self.at).copied()
    }
    fn text(&self, a: usize, b: usize) -> String {
        self.s[a..b].iter().collect()
    }
    fn word_end(&self, from: usize) -> usize {
        let mut i = from;
        while !ends_word(&self.s, i) {
            i += 1;
        }
        i
    }
    fn next_non_ws(&self) -> usize {
        let mut i = self.at;
        while self.s.get(i).is_some_and(|c| c.is_whitespace()) {
            i += 1;
        }
        i
    }
    /// The next word after white space, as (start, end); empty when none starts there.
    fn peek_word(&self) -> (usize, usize) {
        let a = self.next_non_ws();
        (a, self.word_end(a))
    }
    fn eat_keyword(&mut self, kw: &str) -> bool {
        let (a, b) = self.peek_word();
        if b > a && self.s[a..b].iter().copied().eq(kw.chars()) {
            self.at = b;
            true
        } else {
            false
        }
    }
    /// The operator after white space: (operator, where it starts, its length).
    fn peek_op(&self) -> Option<(Op, usize, usize)> {
        let a = self.next_non_ws();
        op_at(&self.s, a).map(|(op, n)| (op, a, n))
    }

    fn describe(&self, at: usize) -> Option<String> {
        let c = *self.s.get(at)?;
        Some(match c {
            '(' | ')' => format!("\"{c}\""),
            '\'' | '"' => "a quoted value".to_string(),
            _ => {
                let end = match op_at(&self.s, at) {
                    Some((_, n)) => at + n,
                    None => self.word_end(at),
                };
                let word: String = self.s[at..end].iter().take(40).collect();
                let more = if end - at > 40 { "..." } else { "" };
                format!("\"{word}{more}\"")
            }
        })
    }
    fn error(&self, at: usize, message: impl Into<String>) -> ParseError {
        ParseError {
            column: at + 1,
            message: message.into(),
            found: self.describe(at),
        }
    }
    fn enter(&mut self, at: usize) -> Result<(), ParseError> {
        self.depth += 1;
        if self.depth > MAX_EXPR_DEPTH {
            return Err(ParseError {
                column: at + 1,
                message: format!("the expression nests deeper than {MAX_EXPR_DEPTH} levels"),
                found: None,
            });
        }
        Ok(())
    }
    fn leave(&mut self) {
        self.depth -= 1;
    }
    fn close(&mut self, open: usize) -> Result<(), ParseError> {
        self.skip_ws();
        if self.peek() == Some(')') {
            self.at += 1;
            return Ok(());
        }
        Err(self.error(
            self.at,
            format!(
                "the \"(\" at column {} is not closed: expected \")\"",
                open + 1
            ),
        ))
    }

    fn or(&mut self) -> Result<Expr, ParseError> {
        let mut items = vec![self.and()?];
        while self.eat_keyword("or") {
            items.push(self.and()?);
        }
        Ok(one_or(items, Expr::Or))
    }
    fn and(&mut self) -> Result<Expr, ParseError> {
        let mut items = vec![self.unary()?];
        while self.eat_keyword("and") {
            items.push(self.unary()?);
        }
        Ok(one_or(items, Expr::And))
    }
    fn unary(&mut self) -> Result<Expr, ParseError> {
        let at = self.next_non_ws();
        if self.eat_keyword("not") {
            self.enter(at)?;
            let inner = self.unary()?;
            self.leave();
            return Ok(Expr::Not(Box::new(inner)));
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Expr, ParseError> {
        self.skip_ws();
        let start = self.at;
        match self.peek() {
            None => return Err(self.error(start, TERM)),
            Some('(') => {
                self.at += 1;
                self.enter(start)?;
                let inner = self.or()?;
                self.close(start)?;
                self.leave();
                return Ok(inner);
            }
            Some('@') => return self.file(start),
            Some(_) => {}
        }
        let end = self.word_end(start);
        if end == start {
            if let Some((op, _)) = op_at(&self.s, start) {
                return Err(self.error(
                    start,
                    format!(
                        "expected a fact or plugin path before \"{op}\" (write e.g. os.family=Debian)"
                    ),
                ));
            }
            return Err(self.error(start, TERM));
        }
        let word = self.text(start, end);
        if matches!(word.as_str(), "and" | "or") {
            return Err(self.error(start, TERM));
        }
        self.at = end;
        if let Some((op, at, n)) = self.peek_op() {
            let path = self.path(start, end, Root::Auto)?;
            self.at = at + n;
            let test = self.value(op)?;
            return Ok(Expr::Compare { path, test });
        }
        let (a, b) = self.peek_word();
        if self.s[a..b].iter().copied().eq("has".chars()) {
            let path = self.path(start, end, Root::Auto)?;
            self.at = b;
            let member = self.member()?;
            return Ok(Expr::Has { path, member });
        }
        if word == "exists" && b > a && !is_reserved(&self.text(a, b)) {
            self.at = b;
            return Ok(Expr::Exists(self.path(a, b, Root::Auto)?));
        }
        match word.as_str() {
            "all" => Ok(Expr::All),
            "-" => Ok(Expr::NamesFrom(Source::Stdin)),
            _ => self.names(&word, start),
        }
    }

    /// `@file`: the name runs to white space, or to a `)` that closes nothing inside it, as in
    /// node sets.
    fn file(&mut self, start: usize) -> Result<Expr, ParseError> {
        let mut i = start + 1;
        let mut depth = 0usize;
        while let Some(&c) = self.s.get(i) {
            if c.is_whitespace() {
                break;
            }
            if c == '(' {
                depth += 1;
            } else if c == ')' {
                if depth == 0 {
                    break;
                }
                depth -= 1;
            }
            i += 1;
        }
        if i == start + 1 {
            return Err(self.error(i, "expected a file name after \"@\""));
        }
        self.at = i;
        Ok(Expr::NamesFrom(Source::File(self.text(start + 1, i))))
    }

    fn names(&self, word: &str, start: usize) -> Result<Expr, ParseError> {
        let bad_name = |at: usize, e: NameError| ParseError {
            column: at + 1,
            message: format!(
                "{e}; a term is a node name, a glob, \"all\" or a condition such as os.family=Debian"
            ),
            found: None,
        };
        if word.contains(',') {
            let mut names = BTreeSet::new();
            let mut at = start;
            for part in word.split(',') {
                if !part.is_empty() {
                    names.insert(NodeName::new(part).map_err(|e| bad_name(at, e))?);
                }
                at += part.chars().count() + 1;
            }
            if names.is_empty() {
                return Err(self.error(start, "expected a node name in the list"));
            }
            return Ok(Expr::Names(names));
        }
        if word.contains(['*', '?', '[']) {
            return glob::Pattern::new(word)
                .map(Expr::Glob)
                .map_err(|e| ParseError {
                    column: start + 1,
                    message: format!("{word:?} is not a glob: {}", e.msg),
                    found: None,
                });
        }
        NodeName::new(word)
            .map(|n| Expr::Names([n].into()))
            .map_err(|e| bad_name(start, e))
    }

    /// A path from the word `start..end`.
    fn path(&self, start: usize, end: usize, root: Root) -> Result<Path, ParseError> {
        let w = &self.s[start..end];
        let at = |i: usize, message: String| ParseError {
            column: start + i + 1,
            message,
            found: None,
        };
        let mut root = root;
        let mut i = 0;
        if w.first() == Some(&'.') {
            if root == Root::Element {
                return Err(at(
                    0,
                    "a path inside \"has\" starts with a field name, not \".\"".into(),
                ));
            }
            root = Root::Document;
            i = 1;
        }
        let mut steps = vec![];
        loop {
            let key_start = i;
            while i < w.len() && !matches!(w[i], '.' | '[' | ']') {
                let c = w[i];
                if matches!(c, ',' | '*' | '?' | '\\')
                    || c.is_control()
                    || (c == '$' && i == key_start)
                {
                    return Err(at(
                        i,
                        format!(
                            "a path cannot hold {c:?} here (keys look like os.family or VERSION_ID)"
                        ),
                    ));
                }
                i += 1;
            }
            if i == key_start {
                let word: String = w.iter().collect();
                return Err(at(i, format!("expected a key in the path {word:?}")));
            }
            steps.push(Step::Key(w[key_start..i].iter().collect()));
            while i < w.len() && w[i] == '[' {
                if w.get(i + 1) != Some(&']') {
                    return Err(at(
                        i,
                        "expected \"[]\" (any element); indexes are not supported".into(),
                    ));
                }
                steps.push(Step::Each);
                i += 2;
            }
            if steps.len() > MAX_PATH_STEPS {
                return Err(at(0, format!("a path has at most {MAX_PATH_STEPS} parts")));
            }
            if i == w.len() {
                break;
            }
            if w[i] != '.' {
                return Err(at(i, "expected \".\" or \"[]\" after a key".into()));
            }
            i += 1;
        }
        if root == Root::Auto
            && matches!(steps.first(), Some(Step::Key(k)) if k == RESERVED_PLUGIN_NAME)
        {
            root = Root::Document;
        }
        Ok(Path { root, steps })
    }

    fn value(&mut self, op: Op) -> Result<Test, ParseError> {
        let before = self.at;
        self.skip_ws();
        let spaced = self.at > before;
        let start = self.at;
        let expected = format!("expected a value after \"{op}\"");
        let text = match self.peek() {
            None | Some(')') => return Err(self.error(start, expected)),
            Some(q @ ('\'' | '"')) => self.quoted(q)?,
            Some(_) => {
                let mut depth = 0usize;
                let mut i = start;
                while let Some(&c) = self.s.get(i) {
                    if c.is_whitespace() {
                        break;
                    }
                    if c == '(' {
                        depth += 1;
                    } else if c == ')' {
                        if depth == 0 {
                            break;
                        }
                        depth -= 1;
                    }
                    i += 1;
                }
                let text = self.text(start, i);
                if spaced && matches!(text.as_str(), "and" | "or") {
                    return Err(self.error(
                        start,
                        format!("{expected} (quote a value that is the word {text:?})"),
                    ));
                }
                self.at = i;
                text
            }
        };
        Test::new(op, text).map_err(|message| ParseError {
            column: start + 1,
            message,
            found: None,
        })
    }

    fn quoted(&mut self, q: char) -> Result<String, ParseError> {
        let open = self.at;
        self.at += 1;
        let mut out = String::new();
        loop {
            match self.peek() {
                None => {
                    return Err(self.error(
                        self.at,
                        format!("the {q} at column {} is not closed: expected {q}", open + 1),
                    ));
                }
                Some(c) if c == q => {
                    if self.s.get(self.at + 1) == Some(&q) {
                        out.push(q);
                        self.at += 2;
                    } else {
                        self.at += 1;
                        return Ok(out);
                    }
                }
                Some(c) => {
                    out.push(c);
                    self.at += 1;
                }
            }
        }
    }

    fn member(&mut self) -> Result<Member, ParseError> {
        self.skip_ws();
        let start = self.at;
        if self.peek() == Some('(') {
            self.at += 1;
            self.enter(start)?;
            let cond = self.cond_or()?;
            self.close(start)?;
            self.leave();
            return Ok(Member::Where(cond));
        }
        let end = self.word_end(start);
        let word = self.text(start, end);
        if end == start || is_reserved(&word) {
            return Err(self.error(start, "expected a package name or \"(\" after \"has\""));
        }
        self.at = end;
        if RECORD_FIELDS.contains(&word.as_str()) && self.peek_op().is_some() {
            let mut conds = vec![self.field_test(start, end)?];
            loop {
                let save = self.at;
                if self.eat_keyword("and") {
                    let (a, b) = self.peek_word();
                    if RECORD_FIELDS.contains(&self.text(a, b).as_str()) {
                        self.at = b;
                        if self.peek_op().is_some() {
                            conds.push(self.field_test(a, b)?);
                            continue;
                        }
                    }
                }
                self.at = save;
                break;
            }
            return Ok(Member::Where(one_or(conds, Cond::And)));
        }
        let bound = match self.peek_op() {
            Some((op, at, n)) => {
                self.at = at + n;
                Some(self.value(op)?)
            }
            None => None,
        };
        Ok(Member::Package { name: word, bound })
    }

    /// `path OP value` for the element path `start..end`; `self.at` is at `end`.
    fn field_test(&mut self, start: usize, end: usize) -> Result<Cond, ParseError> {
        let path = self.path(start, end, Root::Element)?;
        let Some((op, at, n)) = self.peek_op() else {
            let word = self.text(start, end);
            let at = self.next_non_ws();
            return Err(self.error(
                at,
                format!("expected an operator (= != =~ !~ < <= > >=) after {word:?}"),
            ));
        };
        self.at = at + n;
        let test = self.value(op)?;
        Ok(Cond::Compare { path, test })
    }

    fn cond_or(&mut self) -> Result<Cond, ParseError> {
        let mut items = vec![self.cond_and()?];
        while self.eat_keyword("or") {
            items.push(self.cond_and()?);
        }
        Ok(one_or(items, Cond::Or))
    }
    fn cond_and(&mut self) -> Result<Cond, ParseError> {
        let mut items = vec![self.cond_unary()?];
        while self.eat_keyword("and") {
            items.push(self.cond_unary()?);
        }
        Ok(one_or(items, Cond::And))
    }
    fn cond_unary(&mut self) -> Result<Cond, ParseError> {
        let at = self.next_non_ws();
        if self.eat_keyword("not") {
            self.enter(at)?;
            let inner = self.cond_unary()?;
            self.leave();
            return Ok(Cond::Not(Box::new(inner)));
        }
        self.skip_ws();
        let start = self.at;
        if self.peek() == Some('(') {
            self.at += 1;
            self.enter(start)?;
            let inner = self.cond_or()?;
            self.close(start)?;
            self.leave();
            return Ok(inner);
        }
        let end = self.word_end(start);
        let word = self.text(start, end);
        if end == start || matches!(word.as_str(), "and" | "or") {
            return Err(self.error(
                start,
                "expected a condition on the element's fields (such as name=nginx)",
            ));
        }
        self.at = end;
        if word == "exists" && self.peek_op().is_none() {
            let (a, b) = self.peek_word();
            if b > a && !is_reserved(&self.text(a, b)) {
                self.at = b;
                return Ok(Cond::Exists(self.path(a, b, Root::Element)?));
            }
        }
        self.field_test(start, end)
    }
}

fn one_or<T>(mut items: Vec<T>, many: fn(Vec<T>) -> T) -> T {
    match items.pop() {
        Some(only) if items.is_empty() => only,
        Some(last) => {
            items.push(last);
            many(items)
        }
        None => many(items),
    }
}

/// Read a regex error as one line: the `regex` crate's own message is several, with the
/// pattern drawn above a caret.
fn regex_error(e: &regex::Error) -> String {
    match e {
        regex::Error::Syntax(s) => s
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix("error: "))
            .unwrap_or("bad syntax")
            .to_string(),
        regex::Error::CompiledTooBig(n) => format!("it compiles to more than {n} bytes"),
        other => other.to_string(),
    }
}

impl Test {
    fn new(op: Op, value: String) -> Result<Self, String> {
        let regex = match op {
            Op::Match | Op::NotMatch => Some(
                RegexBuilder::new(&value)
                    .size_limit(REGEX_SIZE_LIMIT)
                    .dfa_size_limit(REGEX_SIZE_LIMIT)
                    .nest_limit(MAX_EXPR_DEPTH as u32)
                    .build()
                    .map_err(|e| format!("{value:?} is not a regex: {}", regex_error(&e)))?,
            ),
            _ => None,
        };
        Ok(Self {
            op,
            number: parse_number(&value),
            value,
            regex,
        })
    }
    pub fn op(&self) -> Op {
        self.op
    }
    pub fn value(&self) -> &str {
        &self.value
    }
    /// The value as a number, when it reads as one.
    pub fn number(&self) -> Option<f64> {
        self.number
    }
    /// Whether a stored value meets the test, as [`Expr::matches`] decides it: callers that
    /// read values from a view refine its rows with this.
    pub fn accepts(&self, v: &Value) -> bool {
        self.holds(v)
    }
}

// ----------------------------------------------------------------------------------------------
// Evaluation
// ----------------------------------------------------------------------------------------------

/// Whether `s` reads as a number: sign, digits with an optional point, optional exponent.
/// Stricter than `f64::from_str` (no `inf`, `nan`), so it can be written as a CouchDB regex.
fn parse_number(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    let digits = |i: usize| {
        b[i.min(b.len())..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count()
    };
    let mut i = usize::from(matches!(b.first(), Some(b'+' | b'-')));
    let int = digits(i);
    i += int;
    let mut frac = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        frac = digits(i);
        i += frac;
    }
    if int + frac == 0 {
        return None;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let exp = digits(i);
        if exp == 0 {
            return None;
        }
        i += exp;
    }
    if i != b.len() {
        return None;
    }
    s.parse::<f64>().ok().filter(|x| x.is_finite())
}

/// A stored value as text: strings as they are, anything else as its JSON.
fn text(v: &Value) -> Cow<'_, str> {
    match v {
        Value::String(s) => Cow::Borrowed(s),
        other => Cow::Owned(other.to_string()),
    }
}

fn equals(v: &Value, want: &str, number: Option<f64>) -> bool {
    if let (Value::Number(n), Some(x)) = (v, number) {
        return n.as_f64() == Some(x);
    }
    text(v) == want
}

/// Whether `f` holds for any value at `steps` below `v`; `[]` tries every element.
fn any_at<'a>(v: &'a Value, steps: &[Step], f: &mut dyn FnMut(&'a Value) -> bool) -> bool {
    let mut v = v;
    for (i, step) in steps.iter().enumerate() {
        match step {
            Step::Key(k) => match v.get(k.as_str()) {
                Some(next) => v = next,
                None => return false,
            },
            Step::Each => {
                let Value::Array(items) = v else {
                    return false;
                };
                let rest = &steps[i + 1..];
                return items.iter().any(|e| any_at(e, rest, &mut *f));
            }
        }
    }
    f(v)
}

impl Path {
    fn first_key(&self) -> Option<&str> {
        match self.steps.first() {
            Some(Step::Key(k)) => Some(k),
            _ => None,
        }
    }
    fn is_key(&self, key: &str) -> bool {
        matches!(self.steps.as_slice(), [Step::Key(k)] if k == key)
    }
    /// The value this path starts from in `doc`, and the plugin whose value it reads (`None`
    /// for announced facts, bookkeeping and elements).
    fn start<'a>(&self, doc: &'a Value) -> (&'a Value, Option<&str>) {
        let first = self.first_key();
        match self.root {
            Root::Element => (doc, None),
            Root::Document => (doc, first.filter(|k| *k != RESERVED_PLUGIN_NAME)),
            Root::Auto => {
                let facts = doc
                    .get(RESERVED_PLUGIN_NAME)
                    .and_then(|m| m.get("facts"))
                    .filter(|f| f.is_object());
                match (facts, first) {
                    (Some(facts), Some(k)) if facts.get(k).is_some() => (facts, None),
                    _ => (doc, first),
                }
            }
        }
    }
    fn any(&self, doc: &Value, f: &mut dyn FnMut(&Value) -> bool) -> bool {
        let (base, _) = self.start(doc);
        any_at(base, &self.steps, f)
    }
}

impl Test {
    /// The comparison on a stored value (no version order).
    fn holds(&self, v: &Value) -> bool {
        // A comparison reads one value: a list or an object at the path is neither equal nor
        // unequal to text (`[]` compares a list's elements, `has` its records). This is also
        // what the values view can answer: it holds the scalars at each path.
        if v.is_array() || v.is_object() {
            return false;
        }
        match self.op {
            Op::Eq => equals(v, &self.value, self.number),
            Op::Ne => !equals(v, &self.value, self.number),
            Op::Match => self.regex.as_ref().is_some_and(|r| r.is_match(&text(v))),
            Op::NotMatch => self.regex.as_ref().is_some_and(|r| !r.is_match(&text(v))),
            Op::Lt | Op::Le | Op::Gt | Op::Ge => {
                let ordering = match self.number {
                    Some(want) => {
                        let have = match v {
                            Value::Number(n) => n.as_f64(),
                            Value::String(s) => parse_number(s),
                            _ => None,
                        };
                        have.and_then(|h| h.partial_cmp(&want))
                    }
                    None => Some(text(v).as_ref().cmp(self.value.as_str())),
                };
                ordering.is_some_and(|o| match self.op {
                    Op::Lt => o.is_lt(),
                    Op::Le => o.is_le(),
                    Op::Gt => o.is_gt(),
                    _ => o.is_ge(),
                })
            }
        }
    }

    /// The comparison on a package version, in the scheme's order.
    fn holds_version(&self, scheme: Scheme, v: &str) -> bool {
        use version::Op as V;
        let meets = |op| version::satisfies(scheme, v, op, &self.value);
        match self.op {
            Op::Lt => meets(V::Lt),
            Op::Le => meets(V::Le),
            Op::Eq => meets(V::Eq),
            Op::Ge => meets(V::Ge),
            Op::Gt => meets(V::Gt),
            Op::Ne => !meets(V::Eq),
            Op::Match => self.regex.as_ref().is_some_and(|r| r.is_match(v)),
            Op::NotMatch => self.regex.as_ref().is_some_and(|r| !r.is_match(v)),
        }
    }
}

/// dpkg's `status` other than `installed` (`config-files`: removed, configuration kept) is
/// not installed; records without a status (rpm) are.
fn installed(o: &Map<String, Value>) -> bool {
    match o.get("status") {
        None | Some(Value::Null) => true,
        Some(v) => text(v) == "installed",
    }
}

/// A package record's version, as `epoch:version-release` when those fields are there.
fn package_version(o: &Map<String, Value>) -> Option<String> {
    let part = |key: &str| {
        o.get(key)
            .filter(|v| !v.is_null())
            .map(text)
            .filter(|s| !s.is_empty() && s != "(none)")
    };
    let version = o.get("version").filter(|v| !v.is_null()).map(text)?;
    let mut out = String::new();
    if let Some(epoch) = part("epoch") {
        out.push_str(&epoch);
        out.push(':');
    }
    out.push_str(&version);
    if let Some(release) = part("release") {
        out.push('-');
        out.push_str(&release);
    }
    Some(out)
}

impl Member {
    fn holds(&self, e: &Value, scheme: Option<Scheme>) -> bool {
        match self {
            Member::Package { name, bound } => {
                let number = parse_number(name);
                match e {
                    Value::Object(o) => {
                        (scheme.is_none() || installed(o))
                            && o.get("name").is_some_and(|n| equals(n, name, number))
                            && bound.as_ref().is_none_or(|b| match scheme {
                                Some(s) => {
                                    package_version(o).is_some_and(|v| b.holds_version(s, &v))
                                }
                                None => o.get("version").is_some_and(|v| b.holds(v)),
                            })
                    }
                    Value::Array(_) => false,
                    scalar => bound.is_none() && equals(scalar, name, number),
                }
            }
            Member::Where(cond) => {
                if scheme.is_some()
                    && !cond.mentions("status")
                    && e.as_object().is_some_and(|o| !installed(o))
                {
                    return false;
                }
                cond.holds(e, scheme)
            }
        }
    }
}

impl Cond {
    fn holds(&self, e: &Value, scheme: Option<Scheme>) -> bool {
        match self {
            Cond::Compare { path, test } => match scheme {
                Some(s) if path.is_key("version") => e
                    .as_object()
                    .and_then(package_version)
                    .is_some_and(|v| test.holds_version(s, &v)),
                _ => any_at(e, &path.steps, &mut |v| test.holds(v)),
            },
            Cond::Exists(path) => any_at(e, &path.steps, &mut |_| true),
            Cond::And(items) => items.iter().all(|c| c.holds(e, scheme)),
            Cond::Or(items) => items.iter().any(|c| c.holds(e, scheme)),
            Cond::Not(c) => !c.holds(e, scheme),
        }
    }
    fn mentions(&self, key: &str) -> bool {
        match self {
            Cond::Compare { path, .. } | Cond::Exists(path) => path.first_key() == Some(key),
            Cond::And(items) | Cond::Or(items) => items.iter().any(|c| c.mentions(key)),
            Cond::Not(c) => c.mentions(key),
        }
    }
}

impl Expr {
    /// Whether the node `node`, whose whole document is `doc`, is selected; `dpkg` and `rpms`
    /// are the package plugins.
    pub fn matches(&self, node: &str, doc: &Value) -> bool {
        self.matches_with(node, doc, &Catalog::default())
    }

    /// [`Expr::matches`] with the package plugins of `catalog`.
    pub fn matches_with(&self, node: &str, doc: &Value, catalog: &Catalog) -> bool {
        match self {
            Expr::All => true,
            Expr::Names(names) => names.iter().any(|n| n.as_str() == node),
            Expr::Glob(p) => p.matches(node),
            Expr::NamesFrom(_) => false,
            Expr::Compare { path, test } => path.any(doc, &mut |v| test.holds(v)),
            Expr::Exists(path) => path.any(doc, &mut |_| true),
            Expr::Has { path, member } => {
                let (base, plugin) = match path.plugin().filter(|p| catalog.scheme(p).is_some()) {
                    Some(p) => (doc, Some(p)),
                    None => path.start(doc),
                };
                let scheme = plugin.and_then(|p| catalog.scheme(p));
                any_at(base, &path.steps, &mut |v| {
                    v.as_array()
                        .is_some_and(|items| items.iter().any(|e| member.holds(e, scheme)))
                })
            }
            Expr::And(items) => items.iter().all(|e| e.matches_with(node, doc, catalog)),
            Expr::Or(items) => items.iter().any(|e| e.matches_with(node, doc, catalog)),
            Expr::Not(e) => !e.matches_with(node, doc, catalog),
        }
    }

    /// `all` alone: the runner broadcasts instead of commanding each node.
    pub fn is_all(&self) -> bool {
        matches!(self, Expr::All)
    }

    /// Names given explicitly in a positive position: the runner commands them even when no
    /// document knows them (as node sets do).
    pub fn explicit_names(&self) -> BTreeSet<NodeName> {
        match self {
            Expr::Names(n) => n.clone(),
            Expr::Or(items) => items.iter().flat_map(Expr::explicit_names).collect(),
            Expr::And(items) => {
                let mut sets = items.iter().map(Expr::explicit_names);
                let first = sets.next().unwrap_or_default();
                sets.fold(first, |acc, s| acc.intersection(&s).cloned().collect())
            }
            _ => BTreeSet::new(),
        }
    }

    /// Replace every `@file` and `-` by the names `read` returns for it: one per line, blank
    /// lines and `#` comments skipped, as in node sets.
    pub fn resolve_sources(
        self,
        read: &mut dyn FnMut(&Source) -> Result<String, String>,
    ) -> Result<Expr, SourceError> {
        Ok(match self {
            Expr::NamesFrom(source) => {
                let text = read(&source).map_err(SourceError::Read)?;
                let origin = match &source {
                    Source::File(f) => f.clone(),
                    Source::Stdin => "stdin".to_string(),
                };
                let mut names = BTreeSet::new();
                for line in text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                {
                    names.insert(NodeName::new(line).map_err(|error| SourceError::BadName {
                        origin: origin.clone(),
                        error,
                    })?);
                }
                Expr::Names(names)
            }
            Expr::And(items) => Expr::And(resolve_all(items, read)?),
            Expr::Or(items) => Expr::Or(resolve_all(items, read)?),
            Expr::Not(e) => Expr::Not(Box::new(e.resolve_sources(read)?)),
            other => other,
        })
    }
}

fn resolve_all(
    items: Vec<Expr>,
    read: &mut dyn FnMut(&Source) -> Result<String, String>,
) -> Result<Vec<Expr>, SourceError> {
    items.into_iter().map(|e| e.resolve_sources(read)).collect()
}

// ----------------------------------------------------------------------------------------------
// Narrowing for CouchDB
// ----------------------------------------------------------------------------------------------

/// A selector while it is built: `True` and `False` simplify away inside `$and` and `$or`.
#[derive(Debug, Clone, PartialEq)]
enum Sel {
    True,
    False,
    Is(Value),
}

impl Sel {
    fn into_value(self) -> Value {
        match self {
            Sel::True => json!({}),
            // Every document has an `_id`.
            Sel::False => json!({"_id": {"$exists": false}}),
            Sel::Is(v) => v,
        }
    }
}

/// The items of `{op: [...]}`, to flatten nested `$and`s and `$or`s.
fn items_of(v: Value, op: &str, out: &mut Vec<Value>) {
    match v {
        Value::Object(m) if m.len() == 1 && m.get(op).is_some_and(Value::is_array) => {
            if let Some(Value::Array(items)) = m.into_iter().next().map(|(_, v)| v) {
                out.extend(items);
            }
        }
        other => out.push(other),
    }
}

fn all_of(items: impl IntoIterator<Item = Sel>) -> Sel {
    let mut out = vec![];
    for s in items {
        match s {
            Sel::True => {}
            Sel::False => return Sel::False,
            Sel::Is(v) => items_of(v, "$and", &mut out),
        }
    }
    match out.len() {
        0 => Sel::True,
        1 => Sel::Is(out.remove(0)),
        _ => Sel::Is(json!({ "$and": out })),
    }
}

fn any_of(items: impl IntoIterator<Item = Sel>) -> Sel {
    let mut out = vec![];
    for s in items {
        match s {
            Sel::True => return Sel::True,
            Sel::False => {}
            Sel::Is(v) => items_of(v, "$or", &mut out),
        }
    }
    match out.len() {
        0 => Sel::False,
        1 => Sel::Is(out.remove(0)),
        _ => Sel::Is(json!({ "$or": out })),
    }
}

fn object(key: String, v: Value) -> Value {
    let mut m = Map::new();
    m.insert(key, v);
    Value::Object(m)
}

/// `cond` (a condition on one value, such as `{"$gt": 5}`) at `steps`: dotted fields, and an
/// `$elemMatch` for each `[]`.
fn at(steps: &[Step], cond: Value) -> Value {
    let field = |steps: &[Step]| {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Key(k) => Some(k.as_str()),
                Step::Each => None,
            })
            .collect::<Vec<_>>()
            .join(".")
    };
    match steps.iter().position(|s| *s == Step::Each) {
        None if steps.is_empty() => cond,
        None => object(field(steps), cond),
        Some(i) => {
            let inner = json!({ "$elemMatch": at(&steps[i + 1..], cond) });
            if i == 0 {
                inner
            } else {
                object(field(&steps[..i]), inner)
            }
        }
    }
}

fn place(path: &Path, cond: Value) -> Sel {
    match path.root {
        Root::Auto => {
            let mut facts = vec![
                Step::Key(RESERVED_PLUGIN_NAME.into()),
                Step::Key("facts".into()),
            ];
            facts.extend(path.steps.iter().cloned());
            any_of([
                Sel::Is(at(&facts, cond.clone())),
                Sel::Is(at(&path.steps, cond)),
            ])
        }
        Root::Document | Root::Element => Sel::Is(at(&path.steps, cond)),
    }
}

/// A number CouchDB compares exactly as we do, as JSON; `None` beyond 2^53.
fn exact_number(x: f64) -> Option<Value> {
    if x.abs() >= EXACT_F64 {
        return None;
    }
    Some(if x.fract() == 0.0 {
        json!(x as i64)
    } else {
        json!(x)
    })
}

/// A PCRE literal: CouchDB's `$regex` is Erlang's `re` over bytes.
fn pcre_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if regex_syntax::is_meta_character(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A CouchDB regex every string matching `source` also matches: the regex's required prefix
/// literals (what `regex` itself uses to skip ahead, so every match starts with one of them),
/// anchored when the regex is. `None` when there is no useful, ASCII-only set of them.
fn regex_hint(source: &str) -> Option<String> {
    use regex_syntax::hir::{
        Look,
        literal::{ExtractKind, Extractor},
    };
    let hir = regex_syntax::ParserBuilder::new()
        .nest_limit(MAX_EXPR_DEPTH as u32)
        .build()
        .parse(source)
        .ok()?;
    let anchored = hir.properties().look_set_prefix().contains(Look::Start);
    let seq = Extractor::new().kind(ExtractKind::Prefix).extract(&hir);
    let literals = seq.literals()?;
    if literals.is_empty() || literals.len() > 16 {
        return None;
    }
    let mut alternatives = vec![];
    for lit in literals {
        let s = std::str::from_utf8(lit.as_bytes()).ok()?;
        if s.is_empty() || !s.chars().all(|c| c.is_ascii() && !c.is_ascii_control()) {
            return None;
        }
        alternatives.push(pcre_escape(s));
    }
    let anchor = if anchored { "^" } else { "" };
    Some(format!("{anchor}(?:{})", alternatives.join("|")))
}

fn exists() -> Value {
    json!({"$exists": true})
}

/// A condition on one stored value that holds whenever `test` does.
fn narrow(test: &Test) -> Value {
    match test.op {
        Op::Eq => narrow_eq(&test.value, test.number),
        Op::Ne | Op::NotMatch => exists(),
        Op::Match => match regex_hint(&test.value) {
            // A number or `true` matches by its JSON text.
            Some(r) => json!({"$or": [{"$regex": r}, {"$not": {"$type": "string"}}]}),
            None => exists(),
        },
        Op::Gt | Op::Ge => match test.number.and_then(exact_number) {
            // Strings (numeric ones included), lists and objects all sort after numbers.
            Some(n) if test.op == Op::Gt => json!({ "$gt": n }),
            Some(n) => json!({ "$gte": n }),
            None => exists(),
        },
        Op::Lt | Op::Le => match test.number.and_then(exact_number) {
            Some(n) => {
                let op = if test.op == Op::Lt { "$lt" } else { "$lte" };
                json!({"$or": [object(op.into(), n), {"$regex": NUMBER_REGEX}]})
            }
            None => exists(),
        },
    }
}

fn narrow_eq(value: &str, number: Option<f64>) -> Value {
    let mut candidates = vec![Value::String(value.to_string())];
    let mut also = vec![];
    if let Some(x) = number {
        match exact_number(x) {
            Some(n) => candidates.push(n),
            None => also.push(json!({"$type": "number"})),
        }
    }
    match value {
        "true" => candidates.push(json!(true)),
        "false" => candidates.push(json!(false)),
        "null" => candidates.push(Value::Null),
        _ => {}
    }
    // A list or object equals a value written as its JSON.
    if value.starts_with('[') {
        also.push(json!({"$type": "array"}));
    }
    if value.starts_with('{') {
        also.push(json!({"$type": "object"}));
    }
    let base = if candidates.len() == 1 {
        json!({ "$eq": candidates.remove(0) })
    } else {
        json!({ "$in": candidates })
    };
    if also.is_empty() {
        base
    } else {
        also.insert(0, base);
        json!({ "$or": also })
    }
}

impl Member {
    fn pos(&self) -> Sel {
        match self {
            Member::Package { name, bound } => {
                let cond = narrow_eq(name, parse_number(name));
                let named = Sel::Is(object("name".into(), cond.clone()));
                if bound.is_some() {
                    named
                } else {
                    any_of([named, Sel::Is(cond)])
                }
            }
            Member::Where(cond) => cond.pos(),
        }
    }
}

impl Cond {
    fn pos(&self) -> Sel {
        match self {
            // The version compares in the package manager's order (and may be composed from
            // epoch and release): only its presence narrows.
            Cond::Compare { path, .. } if path.is_key("version") => {
                Sel::Is(at(&path.steps, exists()))
            }
            Cond::Compare { path, test } => Sel::Is(at(&path.steps, narrow(test))),
            Cond::Exists(path) => Sel::Is(at(&path.steps, exists())),
            Cond::And(items) => all_of(items.iter().map(Cond::pos)),
            Cond::Or(items) => any_of(items.iter().map(Cond::pos)),
            Cond::Not(c) => c.neg(),
        }
    }
    fn neg(&self) -> Sel {
        match self {
            Cond::And(items) => any_of(items.iter().map(Cond::neg)),
            Cond::Or(items) => all_of(items.iter().map(Cond::neg)),
            Cond::Not(c) => c.pos(),
            Cond::Compare { .. } | Cond::Exists(_) => Sel::True,
        }
    }
}

/// The literal start of a glob (`web` of `web*`): `glob` has no escapes, only `*`, `?`, `[`.
fn glob_prefix(p: &str) -> &str {
    let end = p.find(['*', '?', '[']).unwrap_or(p.len());
    let prefix = &p[..end];
    let ascii = prefix
        .char_indices()
        .find(|(_, c)| !c.is_ascii() || c.is_ascii_control())
        .map_or(prefix.len(), |(i, _)| i);
    &prefix[..ascii]
}

impl Expr {
    /// A Mango selector (CouchDB 3 `_find`) that every document this expression matches also
    /// matches; the module documentation lists what it decides exactly.
    pub fn mango(&self) -> Value {
        self.pos().into_value()
    }

    fn pos(&self) -> Sel {
        match self {
            Expr::All => Sel::True,
            Expr::Names(n) => {
                Sel::Is(json!({"_id": {"$in": n.iter().map(NodeName::as_str).collect::<Vec<_>>()}}))
            }
            Expr::Glob(p) => match glob_prefix(p.as_str()) {
                "" => Sel::True,
                prefix => Sel::Is(json!({"_id": {"$regex": format!("^{}", pcre_escape(prefix))}})),
            },
            Expr::NamesFrom(_) => Sel::False,
            Expr::Compare { path, test } => place(path, narrow(test)),
            Expr::Exists(path) => place(path, exists()),
            Expr::Has { path, member } => match member.pos() {
                // CouchDB's `{"$elemMatch": {}}` matches no list at all.
                Sel::True => place(path, json!({"$type": "array"})),
                Sel::False => Sel::False,
                m => place(path, json!({ "$elemMatch": m.into_value() })),
            },
            Expr::And(items) => all_of(items.iter().map(Expr::pos)),
            Expr::Or(items) => any_of(items.iter().map(Expr::pos)),
            Expr::Not(e) => e.neg(),
        }
    }

    /// A selector for the documents this expression does not match (a superset of them).
    fn neg(&self) -> Sel {
        match self {
            Expr::All => Sel::False,
            Expr::Names(n) => Sel::Is(
                json!({"_id": {"$nin": n.iter().map(NodeName::as_str).collect::<Vec<_>>()}}),
            ),
            Expr::And(items) => any_of(items.iter().map(Expr::neg)),
            Expr::Or(items) => all_of(items.iter().map(Expr::neg)),
            Expr::Not(e) => e.pos(),
            Expr::Glob(_)
            | Expr::NamesFrom(_)
            | Expr::Compare { .. }
            | Expr::Exists(_)
            | Expr::Has { .. } => Sel::True,
        }
    }

    /// The document fields [`Expr::matches`] reads, as Mango `fields` paths: plugin values by
    /// their top-level key, announced facts as `vogeler.facts` (not the whole bookkeeping).
    /// The caller adds `_id`. Names and globs need none.
    pub fn fields(&self) -> Vec<String> {
        let mut out = BTreeSet::new();
        self.collect_fields(&mut out);
        if out.contains(RESERVED_PLUGIN_NAME) {
            let prefix = format!("{RESERVED_PLUGIN_NAME}.");
            out.retain(|f| !f.starts_with(&prefix));
        }
        out.into_iter().collect()
    }

    fn collect_fields(&self, out: &mut BTreeSet<String>) {
        let mut add = |path: &Path| {
            let keys: Vec<&str> = path
                .steps
                .iter()
                .map_while(|s| match s {
                    Step::Key(k) => Some(k.as_str()),
                    Step::Each => None,
                })
                .collect();
            match (path.root, keys.as_slice()) {
                (Root::Element, _) | (_, []) => {}
                (Root::Auto, [first, ..]) => {
                    out.insert(format!("{RESERVED_PLUGIN_NAME}.facts"));
                    out.insert((*first).to_string());
                }
                (Root::Document, [RESERVED_PLUGIN_NAME, second, ..]) => {
                    out.insert(format!("{RESERVED_PLUGIN_NAME}.{second}"));
                }
                (Root::Document, [first, ..]) => {
                    out.insert((*first).to_string());
                }
            }
        };
        match self {
            Expr::Compare { path, .. } | Expr::Exists(path) | Expr::Has { path, .. } => add(path),
            Expr::And(items) | Expr::Or(items) => {
                for e in items {
                    e.collect_fields(out);
                }
            }
            Expr::Not(e) => e.collect_fields(out),
            Expr::All | Expr::Names(_) | Expr::Glob(_) | Expr::NamesFrom(_) => {}
        }
    }
}

// ----------------------------------------------------------------------------------------------
// Display: the canonical spelling, which parses back to the same expression
// ----------------------------------------------------------------------------------------------

// ----------------------------------------------------------------------------------------------
// Reading from views
// ----------------------------------------------------------------------------------------------

impl Path {
    /// The path as the values view ([`crate::design::VALUES`]) keys it, when that view can
    /// answer it: a bare path of keys (announced facts first, then plugin values, the rule
    /// the view applies too), none of them containing a `.`, not into the bookkeeping.
    /// `None` for `.P`, `vogeler…`, paths through `[]` and paths inside `has`.
    pub fn view_key(&self) -> Option<String> {
        // The view indexes paths so deep, and no document keys starting with `_` (`_id`).
        if self.root != Root::Auto
            || self.steps.len() > crate::design::VALUES_MAX_DEPTH
            || self.first_key().is_none_or(|k| k.starts_with('_'))
        {
            return None;
        }
        let mut keys = Vec::with_capacity(self.steps.len());
        for step in &self.steps {
            match step {
                Step::Key(k) if !k.contains('.') && !k.is_empty() => keys.push(k.as_str()),
                _ => return None,
            }
        }
        (keys.first() != Some(&RESERVED_PLUGIN_NAME)).then(|| keys.join("."))
    }

    /// Every value at this path in `doc` (announced facts first for a bare path; each element
    /// for `[]`), as [`Expr::matches`] reads them: `query --fields` shows these.
    pub fn read<'a>(&self, doc: &'a Value) -> Vec<&'a Value> {
        let mut out = Vec::new();
        let (base, _) = self.start(doc);
        any_at(base, &self.steps, &mut |v| {
            out.push(v);
            false
        });
        out
    }

    /// The plugin a one-key path names (`dpkg` in `dpkg has …`), from any root but an element.
    pub fn plugin(&self) -> Option<&str> {
        match (self.root, self.steps.as_slice()) {
            (Root::Element, _) => None,
            (_, [Step::Key(k)]) if k != RESERVED_PLUGIN_NAME => Some(k),
            _ => None,
        }
    }
}

/// The versions (`epoch:version-release`, as the packages view keys them) of the installed
/// records named `name` in a package inventory's list: what the view holds of a list it
/// could index, computed from a document for one it marked as unindexed.
pub fn installed_versions(list: &Value, name: &str) -> Vec<Option<String>> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
        .filter(|o| installed(o) && o.get("name").is_some_and(|n| text(n) == name))
        .map(package_version)
        .collect()
}

impl Member {
    /// The package name every element meeting this must have, when it says so: `has openssl`,
    /// `has name=nginx and …`. The packages view is read by name, so only these can use it.
    pub fn pinned_name(&self) -> Option<&str> {
        fn pinned(c: &Cond) -> Option<&str> {
            match c {
                Cond::Compare { path, test } if path.is_key("name") && test.op == Op::Eq => {
                    Some(test.value.as_str())
                }
                Cond::And(items) => items.iter().find_map(pinned),
                _ => None,
            }
        }
        match self {
            Member::Package { name, .. } => Some(name),
            Member::Where(c) => pinned(c),
        }
    }

    /// Whether the conditions read only the fields the packages view keeps of a record
    /// (`name`, `version`, `arch`, `epoch`, `release`; not `status`: the view holds installed
    /// packages only).
    pub fn reads_record_fields_only(&self) -> bool {
        fn only(c: &Cond) -> bool {
            match c {
                Cond::Compare { path, .. } | Cond::Exists(path) => path
                    .first_key()
                    .is_some_and(|k| RECORD_FIELDS.contains(&k) && k != "status"),
                Cond::And(items) | Cond::Or(items) => items.iter().all(only),
                Cond::Not(c) => only(c),
            }
        }
        match self {
            Member::Package { .. } => true,
            Member::Where(c) => only(c),
        }
    }

    /// Whether one list element meets this, in `scheme`'s version order for a package
    /// inventory: callers that read records from a view refine its rows with this.
    pub fn accepts(&self, element: &Value, scheme: Option<Scheme>) -> bool {
        self.holds(element, scheme)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = OPS.iter().find(|(_, o)| o == self).map_or("?", |(s, _)| s);
        f.write_str(s)
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let starts_vogeler = self.first_key() == Some(RESERVED_PLUGIN_NAME);
        if self.root == Root::Document && !starts_vogeler {
            f.write_str(".")?;
        }
        for (i, step) in self.steps.iter().enumerate() {
            match step {
                Step::Key(k) if i == 0 => f.write_str(k)?,
                Step::Key(k) => write!(f, ".{k}")?,
                Step::Each => f.write_str("[]")?,
            }
        }
        Ok(())
    }
}

/// A value as the lexer reads it back: bare when it can be, else quoted with `'` doubled.
fn write_value(f: &mut fmt::Formatter<'_>, v: &str) -> fmt::Result {
    let mut depth = 0i64;
    let mut bare = !v.is_empty() && !v.starts_with(['\'', '"']) && !matches!(v, "and" | "or");
    for c in v.chars() {
        if c.is_whitespace() {
            bare = false;
        } else if c == '(' {
            depth += 1;
        } else if c == ')' {
            depth -= 1;
            if depth < 0 {
                bare = false;
            }
        }
    }
    if bare && depth == 0 {
        f.write_str(v)
    } else {
        write!(f, "'{}'", v.replace('\'', "''"))
    }
}

impl fmt::Display for Test {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ", self.op)?;
        write_value(f, &self.value)
    }
}

fn write_joined<T: fmt::Display>(
    f: &mut fmt::Formatter<'_>,
    items: &[T],
    sep: &str,
    wrap: impl Fn(&T) -> bool,
) -> fmt::Result {
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            f.write_str(sep)?;
        }
        if wrap(item) {
            write!(f, "({item})")?;
        } else {
            write!(f, "{item}")?;
        }
    }
    Ok(())
}

impl fmt::Display for Cond {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cond::Compare { path, test } => write!(f, "{path} {test}"),
            Cond::Exists(path) => write!(f, "exists {path}"),
            Cond::And(items) => write_joined(f, items, " and ", |c| {
                matches!(c, Cond::And(_) | Cond::Or(_))
            }),
            Cond::Or(items) => write_joined(f, items, " or ", |c| matches!(c, Cond::Or(_))),
            Cond::Not(c) if matches!(**c, Cond::And(_) | Cond::Or(_)) => write!(f, "not ({c})"),
            Cond::Not(c) => write!(f, "not {c}"),
        }
    }
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Member::Package { name, bound: None } => f.write_str(name),
            Member::Package {
                name,
                bound: Some(b),
            } => write!(f, "{name} {b}"),
            Member::Where(c) => write!(f, "({c})"),
        }
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::All => f.write_str("all"),
            Expr::Names(names) => {
                let list: Vec<&str> = names.iter().map(NodeName::as_str).collect();
                f.write_str(&list.join(","))?;
                // A lone name that reads as a keyword stays a name as a one-item list.
                match list.as_slice() {
                    [one] if matches!(*one, "all" | "and" | "or" | "not" | "exists") => {
                        f.write_str(",")
                    }
                    _ => Ok(()),
                }
            }
            Expr::Glob(p) => f.write_str(p.as_str()),
            Expr::NamesFrom(Source::File(file)) => write!(f, "@{file}"),
            Expr::NamesFrom(Source::Stdin) => f.write_str("-"),
            Expr::Compare { path, test } => write!(f, "{path} {test}"),
            Expr::Exists(path) => write!(f, "exists {path}"),
            Expr::Has { path, member } => write!(f, "{path} has {member}"),
            Expr::And(items) => write_joined(f, items, " and ", |e| {
                matches!(e, Expr::And(_) | Expr::Or(_))
            }),
            Expr::Or(items) => write_joined(f, items, " or ", |e| matches!(e, Expr::Or(_))),
            Expr::Not(e) if matches!(**e, Expr::And(_) | Expr::Or(_)) => write!(f, "not ({e})"),
            Expr::Not(e) => write!(f, "not {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Expr {
        parse(s).unwrap_or_else(|e| panic!("{}: {e}", &s[..s.len().min(80)]))
    }
    fn key(k: &str) -> Step {
        Step::Key(k.into())
    }
    fn path(root: Root, steps: &[Step]) -> Path {
        Path {
            root,
            steps: steps.to_vec(),
        }
    }
    fn test(op: Op, v: &str) -> Test {
        Test::new(op, v.into()).expect("test")
    }
    fn names(n: &[&str]) -> Expr {
        Expr::Names(n.iter().map(|n| NodeName::new(*n).expect("name")).collect())
    }
    fn cmp(root: Root, steps: &[Step], op: Op, v: &str) -> Expr {
        Expr::Compare {
            path: path(root, steps),
            test: test(op, v),
        }
    }

    /// Every example of the module documentation and the issue, and every node-set form.
    const EXAMPLES: &[&str] = &[
        "all",
        "web01",
        "web01,web02",
        "web*",
        "'web*'",
        "db-[0-9]*",
        "@nodes.txt",
        "-",
        "os.family=Debian",
        "kernel=~^6\\.",
        "memory_mb>16000",
        "memory_mb > 16000",
        "facts.memory_mb < 4096",
        "os_release.VERSION_ID = 12",
        "disks[].use_percent > 90",
        "exists os_release.VERSION_ID",
        "dpkg has openssl < 3.0.13",
        "dpkg has name=nginx and version=~^1\\.22",
        "disks has (target = / and use_percent > 90)",
        "web* and not (os.family=RedHat or kernel=~^5)",
        "os.family=Debian and not kernel=~^5",
        "(a or b) and c",
        "(kernel=~^(5|6\\.8))",
        "web02 or os.family=Debian and memory_mb>32000",
        "all and not db*",
        ".kernel =~ Linux",
        "vogeler.facts.kernel = 6.1",
        "hello has alpha",
        "dpkg has (name = nginx or name = apache2) and os.family = Debian",
        "rpms has openssl >= 1:3.0.7-16.el9",
        "os.name = 'Debian GNU/Linux'",
        "users has (name = 'o''brien')",
        "not not web01",
    ];

    #[test]
    fn parses_the_documented_examples() {
        for s in EXAMPLES.iter().filter(|s| !s.starts_with('\'')) {
            p(s);
        }
        assert_eq!(p("all"), Expr::All);
        assert_eq!(p("web01"), names(&["web01"]));
        assert_eq!(p("web01,web02"), names(&["web01", "web02"]));
        assert_eq!(
            p("web01,"),
            names(&["web01"]),
            "a trailing comma, as node sets allowed"
        );
        assert_eq!(
            p("web*"),
            Expr::Glob(glob::Pattern::new("web*").expect("glob"))
        );
        assert_eq!(
            p("@nodes.txt"),
            Expr::NamesFrom(Source::File("nodes.txt".into()))
        );
        assert_eq!(p("-"), Expr::NamesFrom(Source::Stdin));
        assert_eq!(
            p("os.family=Debian"),
            cmp(Root::Auto, &[key("os"), key("family")], Op::Eq, "Debian")
        );
        assert_eq!(p("memory_mb>16000"), p("memory_mb > 16000"));
        assert_eq!(
            p("facts.memory_mb < 4096"),
            cmp(
                Root::Auto,
                &[key("facts"), key("memory_mb")],
                Op::Lt,
                "4096"
            )
        );
        assert_eq!(
            p("disks[].use_percent > 90"),
            cmp(
                Root::Auto,
                &[key("disks"), Step::Each, key("use_percent")],
                Op::Gt,
                "90"
            )
        );
        assert_eq!(
            p(".kernel =~ Linux"),
            cmp(Root::Document, &[key("kernel")], Op::Match, "Linux")
        );
        assert_eq!(
            p("vogeler.facts.kernel = 6.1"),
            cmp(
                Root::Document,
                &[key("vogeler"), key("facts"), key("kernel")],
                Op::Eq,
                "6.1"
            ),
            "vogeler is never a plugin"
        );
        assert_eq!(
            p("kernel=~^(5|6\\.8)"),
            cmp(Root::Auto, &[key("kernel")], Op::Match, "^(5|6\\.8)"),
            "a regex group stays in the value"
        );
        assert_eq!(
            p("(kernel=~^(5|6\\.8))"),
            p("kernel=~^(5|6\\.8)"),
            "and the closing parenthesis after it groups"
        );
        assert_eq!(
            p("exists os_release.VERSION_ID"),
            Expr::Exists(path(Root::Auto, &[key("os_release"), key("VERSION_ID")]))
        );
        assert_eq!(
            p("os.name = 'Debian GNU/Linux'"),
            cmp(
                Root::Auto,
                &[key("os"), key("name")],
                Op::Eq,
                "Debian GNU/Linux"
            )
        );
        assert_eq!(
            p("x = 'it''s'"),
            cmp(Root::Auto, &[key("x")], Op::Eq, "it's"),
            "a doubled quote is a quote"
        );
        assert_eq!(
            p("x =~ '^1\\.22'"),
            cmp(Root::Auto, &[key("x")], Op::Match, "^1\\.22"),
            "backslashes are kept"
        );
        assert_eq!(p("x=a=b"), cmp(Root::Auto, &[key("x")], Op::Eq, "a=b"));
        assert_eq!(
            p("x=and"),
            cmp(Root::Auto, &[key("x")], Op::Eq, "and"),
            "glued, a value"
        );
        assert_eq!(p("x = 'and'"), cmp(Root::Auto, &[key("x")], Op::Eq, "and"));
    }

    #[test]
    fn has_reads_shorthand_conditions_and_parentheses() {
        let dpkg = path(Root::Auto, &[key("dpkg")]);
        let elem = |k: &str| path(Root::Element, &[key(k)]);
        assert_eq!(
            p("dpkg has openssl < 3.0.13"),
            Expr::Has {
                path: dpkg.clone(),
                member: Member::Package {
                    name: "openssl".into(),
                    bound: Some(test(Op::Lt, "3.0.13")),
                },
            }
        );
        assert_eq!(p("dpkg has openssl<3.0.13"), p("dpkg has openssl < 3.0.13"));
        assert_eq!(
            p("dpkg has openssl"),
            Expr::Has {
                path: dpkg.clone(),
                member: Member::Package {
                    name: "openssl".into(),
                    bound: None
                },
            }
        );
        let both = Expr::Has {
            path: dpkg.clone(),
            member: Member::Where(Cond::And(vec![
                Cond::Compare {
                    path: elem("name"),
                    test: test(Op::Eq, "nginx"),
                },
                Cond::Compare {
                    path: elem("version"),
                    test: test(Op::Match, "^1\\.22"),
                },
            ])),
        };
        assert_eq!(p("dpkg has name=nginx and version=~^1\\.22"), both);
        assert_eq!(p("dpkg has (name = nginx and version =~ ^1\\.22)"), both);
        // The conditions end at the first `and` that is not about a record field.
        assert_eq!(
            p("dpkg has name=nginx and os.family=Debian"),
            Expr::And(vec![
                Expr::Has {
                    path: dpkg.clone(),
                    member: Member::Where(Cond::Compare {
                        path: elem("name"),
                        test: test(Op::Eq, "nginx"),
                    }),
                },
                cmp(Root::Auto, &[key("os"), key("family")], Op::Eq, "Debian"),
            ])
        );
        // The shorthand is one term.
        assert_eq!(
            p("dpkg has openssl and version = 3"),
            Expr::And(vec![
                Expr::Has {
                    path: dpkg.clone(),
                    member: Member::Package {
                        name: "openssl".into(),
                        bound: None
                    },
                },
                cmp(Root::Auto, &[key("version")], Op::Eq, "3"),
            ])
        );
        // `or` always ends them.
        assert!(matches!(p("dpkg has name=a or name=b"), Expr::Or(_)));
        assert_eq!(
            p("disks has (target = / and not use% < 90)"),
            Expr::Has {
                path: path(Root::Auto, &[key("disks")]),
                member: Member::Where(Cond::And(vec![
                    Cond::Compare {
                        path: elem("target"),
                        test: test(Op::Eq, "/"),
                    },
                    Cond::Not(Box::new(Cond::Compare {
                        path: elem("use%"),
                        test: test(Op::Lt, "90"),
                    })),
                ])),
            }
        );
        assert_eq!(
            p("disks has (exists target)"),
            Expr::Has {
                path: path(Root::Auto, &[key("disks")]),
                member: Member::Where(Cond::Exists(elem("target"))),
            }
        );
    }

    #[test]
    fn precedence_is_not_and_or() {
        let (a, b, c) = (names(&["a"]), names(&["b"]), names(&["c"]));
        assert_eq!(
            p("(a or b) and c"),
            Expr::And(vec![Expr::Or(vec![a.clone(), b.clone()]), c.clone()])
        );
        assert_eq!(
            p("a or b and c"),
            Expr::Or(vec![a.clone(), Expr::And(vec![b.clone(), c.clone()])])
        );
        assert_eq!(
            p("not a and b"),
            Expr::And(vec![Expr::Not(Box::new(a.clone())), b.clone()])
        );
        assert_eq!(p("not(a)"), Expr::Not(Box::new(a.clone())));
        assert_eq!(
            p("a or b or c"),
            Expr::Or(vec![a, b, c]),
            "chains are flat lists, never deep trees"
        );
    }

    #[test]
    fn keywords_stay_names_where_the_grammar_has_no_place_for_them() {
        assert_eq!(p("exists"), names(&["exists"]));
        assert_eq!(p("has"), names(&["has"]));
        assert_eq!(
            p("exists or web01"),
            Expr::Or(vec![names(&["exists"]), names(&["web01"])])
        );
        assert_eq!(p("all=1"), cmp(Root::Auto, &[key("all")], Op::Eq, "1"));
        assert_eq!(
            p("exists=1"),
            cmp(Root::Auto, &[key("exists")], Op::Eq, "1")
        );
        assert_eq!(p("and,"), names(&["and"]), "a list of one reserved word");
    }

    #[test]
    fn display_parses_back_to_the_same_expression() {
        let more = [
            "x = ''",
            "x = 'a b'",
            "x = ')'",
            "x = '(a'",
            "x = \"it's\"",
            "not (a and b)",
            "(a or b) or c",
            "(a and b) and c",
            "a and (b or c) and not (d or e)",
            "dpkg has (name = x or not (version < 1 and arch = amd64))",
            "hello[] = beta",
            "and,",
            "x = 'and'",
        ];
        for s in EXAMPLES
            .iter()
            .filter(|s| !s.starts_with('\''))
            .chain(more.iter())
        {
            let e = p(s);
            let shown = e.to_string();
            assert_eq!(parse(&shown), Ok(e), "{s} shown as {shown}");
        }
        assert_eq!(
            p("dpkg has name=nginx and version=~^1\\.22").to_string(),
            "dpkg has (name = nginx and version =~ ^1\\.22)"
        );
        assert_eq!(p("web02,web01").to_string(), "web01,web02");
    }

    #[test]
    fn errors_say_what_was_expected_and_where() {
        for (s, want) in [
            (
                "facts.memory_mb < ",
                "expected a value after \"<\" at column 19",
            ),
            (
                "facts.memory_mb < )",
                "expected a value after \"<\" at column 19, found \")\"",
            ),
            (
                "(web01",
                "the \"(\" at column 1 is not closed: expected \")\" at column 7",
            ),
            (
                "web01 web02",
                "expected \"and\", \"or\" or the end at column 7, found \"web02\"",
            ),
            (
                "web01)",
                "expected \"and\", \"or\" or the end at column 6, found \")\"",
            ),
            (
                "and web01",
                "expected a node name, a glob, \"all\" or a condition at column 1, found \"and\"",
            ),
            (
                "",
                "expected a node name, a glob, \"all\" or a condition at column 1",
            ),
            (
                "web01 and",
                "expected a node name, a glob, \"all\" or a condition at column 10",
            ),
            (
                "kernel=~[",
                "\"[\" is not a regex: unclosed character class at column 9",
            ),
            (
                "=Debian",
                "expected a fact or plugin path before \"=\" (write e.g. os.family=Debian) at column 1, found \"=\"",
            ),
            (
                "_bad",
                "node name \"_bad\" must start with a letter or digit; a term is a node name, a glob, \"all\" or a condition such as os.family=Debian at column 1",
            ),
            (
                "web01,_bad",
                "node name \"_bad\" must start with a letter or digit; a term is a node name, a glob, \"all\" or a condition such as os.family=Debian at column 7",
            ),
            (
                "dpkg has",
                "expected a package name or \"(\" after \"has\" at column 9",
            ),
            (
                "dpkg has and",
                "expected a package name or \"(\" after \"has\" at column 10, found \"and\"",
            ),
            (
                "dpkg has (name)",
                "expected an operator (= != =~ !~ < <= > >=) after \"name\" at column 15, found \")\"",
            ),
            (
                "dpkg has (name = x",
                "the \"(\" at column 10 is not closed: expected \")\" at column 19",
            ),
            (
                "disks[0].use > 1",
                "expected \"[]\" (any element); indexes are not supported at column 6",
            ),
            (
                "a..b = 1",
                "expected a key in the path \"a..b\" at column 3",
            ),
            ("a. = 1", "expected a key in the path \"a.\" at column 3"),
            (
                "a[]b = 1",
                "expected \".\" or \"[]\" after a key at column 4",
            ),
            (
                "web* = 1",
                "a path cannot hold '*' here (keys look like os.family or VERSION_ID) at column 4",
            ),
            (
                "os.name = 'Debian",
                "the ' at column 11 is not closed: expected ' at column 18",
            ),
            (
                "os.family = and web01",
                "expected a value after \"=\" (quote a value that is the word \"and\") at column 13, found \"and\"",
            ),
            ("@", "expected a file name after \"@\" at column 2"),
            (
                "db-[",
                "\"db-[\" is not a glob: invalid range pattern at column 1",
            ),
            (
                "dpkg has (.name = x)",
                "a path inside \"has\" starts with a field name, not \".\" at column 11",
            ),
        ] {
            let got = parse(s).expect_err(s).to_string();
            assert_eq!(got, want, "{s}");
        }
    }

    #[test]
    fn deep_or_huge_input_is_an_error_not_a_stack_overflow() {
        let deep = format!("{}web01{}", "(".repeat(10_000), ")".repeat(10_000));
        let e = parse(&deep).expect_err("deep");
        assert_eq!(
            e.to_string(),
            "the expression nests deeper than 64 levels at column 65"
        );
        let nots = format!("{}web01", "not ".repeat(10_000));
        assert!(
            parse(&nots)
                .expect_err("nots")
                .message
                .contains("nests deeper")
        );
        let has = format!(
            "dpkg has {}name = x{}",
            "(".repeat(10_000),
            ")".repeat(10_000)
        );
        assert!(
            parse(&has)
                .expect_err("has")
                .message
                .contains("nests deeper")
        );
        let huge = "a".repeat(1 << 20);
        assert_eq!(
            parse(&huge).expect_err("huge").to_string(),
            "the expression is 1048576 bytes long, more than the 65536 allowed at column 1"
        );
        let quoted = format!("x = '{}'", "a".repeat(1 << 20));
        assert!(parse(&quoted).is_err());
        let long_path = format!("{} = 1", vec!["a"; 40].join("."));
        assert!(
            parse(&long_path)
                .expect_err("path")
                .message
                .contains("at most 32 parts")
        );

        // 64 levels are fine, and long flat chains are lists: evaluated, narrowed, dropped.
        let ok = format!("{}web01{}", "(".repeat(64), ")".repeat(64));
        p(&ok);
        let chain = vec!["memory_mb > 1"; 3_000].join(" or ");
        let e = p(&chain);
        assert!(!e.matches("web01", &json!({})));
        assert!(e.mango().is_object());
        let chain = vec!["not web01"; 3_000].join(" and ");
        let e = p(&chain);
        assert!(e.matches("web02", &json!({})));
        drop(e);
        // Regexes are bounded too.
        assert!(
            parse("x =~ '(a{1000}){1000}'")
                .expect_err("big regex")
                .message
                .contains("compiles to more than")
        );
    }

    /// 48 ordinary packages of a Debian 12 host, plus openssl and nginx below.
    const PACKAGES: &[(&str, &str)] = &[
        ("adduser", "3.134"),
        ("apt", "2.6.1"),
        ("base-files", "12.4+deb12u5"),
        ("base-passwd", "3.6.1"),
        ("bash", "5.2.15-2+b2"),
        ("bsdutils", "1:2.38.1-5+deb12u1"),
        ("ca-certificates", "20230311"),
        ("coreutils", "9.1-1"),
        ("curl", "7.88.1-10+deb12u5"),
        ("dash", "0.5.12-2"),
        ("debconf", "1.5.82"),
        ("debian-archive-keyring", "2023.3+deb12u1"),
        ("debianutils", "5.7-0.5~deb12u1"),
        ("diffutils", "1:3.8-4"),
        ("dpkg", "1.21.22"),
        ("e2fsprogs", "1.47.0-2"),
        ("findutils", "4.9.0-4"),
        ("gcc-12-base", "12.2.0-14"),
        ("gpgv", "2.2.40-1.1"),
        ("grep", "3.8-5"),
        ("gzip", "1.12-1"),
        ("hostname", "3.23+nmu1"),
        ("init-system-helpers", "1.65.2"),
        ("libacl1", "2.3.1-3"),
        ("libc-bin", "2.36-9+deb12u4"),
        ("libc6", "2.36-9+deb12u4"),
        ("libcurl4", "7.88.1-10+deb12u5"),
        ("libgcc-s1", "12.2.0-14"),
        ("libpcre2-8-0", "10.42-1"),
        ("libselinux1", "3.4-1+b6"),
        ("libssl3", "3.0.11-1~deb12u2"),
        ("libsystemd0", "252.22-1~deb12u1"),
        ("libzstd1", "1.5.4+dfsg2-5"),
        ("login", "1:4.13+dfsg1-1+b1"),
        ("mawk", "1.3.4.20200120-3.1"),
        ("mount", "2.38.1-5+deb12u1"),
        ("ncurses-base", "6.4-4"),
        ("nginx-common", "1.22.1-9"),
        ("openssh-server", "1:9.2p1-2+deb12u2"),
        ("passwd", "1:4.13+dfsg1-1+b1"),
        ("perl-base", "5.36.0-7+deb12u1"),
        ("procps", "2:4.0.2-3"),
        ("sed", "4.9-1"),
        ("systemd", "252.22-1~deb12u1"),
        ("sysvinit-utils", "3.06-4"),
        ("tar", "1.34+dfsg-1.2+deb12u1"),
        ("tzdata", "2024a-0+deb12u1"),
        ("util-linux", "2.38.1-5+deb12u1"),
    ];

    /// web01 as CouchDB stores it: announced facts, plugin values, bookkeeping.
    fn web01() -> Value {
        let mut dpkg: Vec<Value> = PACKAGES
            .iter()
            .map(|(n, v)| json!({"name": n, "version": v, "arch": "amd64", "status": "installed"}))
            .collect();
        dpkg.push(json!({"name": "openssl", "version": "3.0.11-1~deb12u2", "arch": "amd64", "status": "installed"}));
        dpkg.push(
            json!({"name": "nginx", "version": "1.22.1-9", "arch": "amd64", "status": "installed"}),
        );
        dpkg.push(json!({"name": "apache2", "version": "2.4.57-2", "arch": "amd64", "status": "config-files"}));
        assert_eq!(dpkg.len(), 51);
        json!({
            "_id": "web01",
            "_rev": "7-abc",
            "dpkg": dpkg,
            "kernel": "Linux 6.1.0-18-amd64 x86_64",
            "facts": {"hostname": "web01", "fqdn": "web01.example.com", "memory_mb": 3936,
                      "cpus": 2, "ipv4": ["10.0.0.5", "172.17.0.1"]},
            "os_release": {"ID": "debian", "VERSION_ID": "12", "PRETTY_NAME": "Debian GNU/Linux 12 (bookworm)"},
            "disks": [
                {"target": "/", "fstype": "ext4", "size": 20_000_000_000u64, "use_percent": 93, "use%": "93%"},
                {"target": "/boot", "fstype": "ext4", "size": 500_000_000, "use_percent": "41", "use%": "41%"},
            ],
            "hello": ["alpha", "beta"],
            "vogeler": {
                "created_at": "2026-01-01T00:00:00Z",
                "updated_at": "2026-01-02T00:00:00Z",
                "agent_version": "0.1.0",
                "facts": {"hostname": "web01", "kernel": "6.1.0-18-amd64", "arch": "x86_64",
                          "os": {"id": "debian", "family": "Debian", "name": "Debian GNU/Linux", "version": "12"},
                          "cpus": 2, "memory_mb": 3936, "role": "web"},
                "plugins": {"dpkg": {"collected_at": "2026-01-02T00:00:00Z", "outcome": "ok", "exit_code": 0}},
            },
        })
    }

    #[test]
    fn evaluates_over_a_whole_node_document() {
        let doc = web01();
        for (s, want) in [
            ("all", true),
            ("web01", true),
            ("web02", false),
            ("web*", true),
            ("db*", false),
            ("web01,db01", true),
            ("os.family=Debian", true),
            ("os.family!=Debian", false),
            ("os.family=RedHat", false),
            ("kernel=~^6\\.", true),
            ("kernel=~^Linux", false),
            ("memory_mb>16000", false),
            ("memory_mb<16000", true),
            ("memory_mb = 3936.0", true),
            ("role = web", true),
            ("facts.memory_mb < 4096", true),
            ("facts.memory_mb < 2048", false),
            ("facts.ipv4[] = 10.0.0.5", true),
            ("facts.ipv4 = 10.0.0.5", false),
            ("facts.fqdn =~ \\.example\\.com$", true),
            ("os_release.VERSION_ID = 12", true),
            ("os_release.VERSION_ID = 12.0", false),
            ("os_release.VERSION_ID >= 12", true),
            ("os_release.VERSION_ID > 11.5", true),
            (
                "os_release.PRETTY_NAME = 'Debian GNU/Linux 12 (bookworm)'",
                true,
            ),
            ("disks[].use_percent > 90", true),
            ("disks[].use_percent > 95", false),
            ("disks[].use_percent = 41", true),
            ("disks[].use% = 93%", true),
            ("disks has (target = / and use_percent > 90)", true),
            ("disks has (target = /boot and use_percent > 90)", false),
            ("not disks[].use_percent > 95", true),
            ("exists disks[].fstype", true),
            ("exists disks[].mountpoint", false),
            ("exists os_release.VERSION_ID", true),
            ("exists os.family", true),
            ("exists os.codename", false),
            ("dpkg has openssl", true),
            ("dpkg has openssl < 3.0.13", true),
            ("dpkg has openssl < 3.0.11", false),
            ("dpkg has openssl = 3.0.11-1~deb12u2", true),
            ("dpkg has openssl != 3.0.11-1~deb12u2", false),
            ("dpkg has openssl >= 3.0.11", true),
            ("dpkg has libssl3 < 3.0.13", true),
            ("dpkg has nginx", true),
            ("dpkg has name=nginx and version=~^1\\.22", true),
            ("dpkg has name=nginx and version=~^1\\.24", false),
            ("dpkg has (name = nginx and version >= 1.22.1)", true),
            ("dpkg has (name = nginx and version > 1.22.1-9)", false),
            ("dpkg has (name = nginx or name = lighttpd)", true),
            ("dpkg has postgresql", false),
            ("dpkg has apache2", false),
            ("dpkg has (name = apache2 and status = config-files)", true),
            ("dpkg has (name = apache2)", false),
            ("dpkg[].name = apache2", true),
            ("dpkg has procps > 4", true),
            ("dpkg has name=nginx and os.family=Debian", true),
            ("hello has alpha", true),
            ("hello has gamma", false),
            ("hello[] = beta", true),
            ("hello has alpha > 1", false),
            (".kernel =~ ^Linux", true),
            (".kernel =~ ^6", false),
            ("vogeler.facts.kernel =~ ^6", true),
            ("vogeler.agent_version = 0.1.0", true),
            ("vogeler.plugins.dpkg.outcome = ok", true),
            ("_id = web01", true),
            ("web* and not (os.family=RedHat or kernel=~^5)", true),
            ("os.family=Debian and not kernel=~^6", false),
            (
                "dpkg has openssl < 3.0.13 and disks[].use_percent > 90",
                true,
            ),
            ("not dpkg has openssl", false),
            ("nothing = x", false),
            ("nothing != x", false),
            ("not nothing = x", true),
            ("nothing !~ x", false),
            ("hostname > a", true),
            ("hostname > x", false),
            ("memory_mb > lots", false),
            ("@nodes.txt", false),
        ] {
            assert_eq!(p(s).matches("web01", &doc), want, "{s}");
        }
    }

    #[test]
    fn versions_follow_the_package_managers_order() {
        let dpkg = |v: &str| json!({"_id": "n", "dpkg": [{"name": "foo", "version": v, "status": "installed"}]});
        let rpms = |r: Value| json!({"_id": "n", "rpms": [r]});
        for (s, doc, want) in [
            // 1.10 is newer than 1.9: string order says otherwise.
            ("dpkg has foo > 1.9", dpkg("1.10"), true),
            ("dpkg has foo < 1.9", dpkg("1.10"), false),
            // An epoch outweighs everything after it.
            ("dpkg has foo > 2.0", dpkg("1:0.1"), true),
            ("dpkg has foo < 2.0", dpkg("1:0.1"), false),
            // `~` sorts before the end: a release candidate precedes the release.
            ("dpkg has foo < 1.0", dpkg("1.0~rc1"), true),
            ("dpkg has foo >= 1.0", dpkg("1.0~rc1"), false),
            (
                "dpkg has (name = foo and version < 1.0)",
                dpkg("1.0~rc1"),
                true,
            ),
            ("dpkg has foo = 1.0", dpkg("1.0-0"), true),
            ("dpkg has foo = 1.0", dpkg("0:1.0"), true),
            ("dpkg has foo != 1.0", dpkg("1.0.1"), true),
            ("dpkg has foo =~ ~rc", dpkg("1.0~rc1"), true),
            ("dpkg[].version < 1.9", dpkg("1.10"), true),
            // rpm: a bound without a release takes every release of its version as equal.
            (
                "rpms has openssl = 3.0.13",
                rpms(json!({"name": "openssl", "version": "3.0.13", "release": "1.el9"})),
                true,
            ),
            (
                "rpms has openssl > 3.0.13",
                rpms(json!({"name": "openssl", "version": "3.0.13", "release": "1.el9"})),
                false,
            ),
            (
                "rpms has openssl < 3.0.13-2.el9",
                rpms(json!({"name": "openssl", "version": "3.0.13", "release": "1.el9"})),
                true,
            ),
            // rpms plugins from before the epoch field store version-release in one field.
            (
                "rpms has openssl >= 3.0.7-16.el9",
                rpms(json!({"name": "openssl", "version": "3.0.13-1.el9"})),
                true,
            ),
            // epoch:version-release is composed from the fields; (none) is no epoch.
            (
                "rpms has openssl > 2:0",
                rpms(
                    json!({"name": "openssl", "epoch": "1", "version": "3.0.13", "release": "1.el9"}),
                ),
                false,
            ),
            (
                "rpms has openssl > 0:9",
                rpms(
                    json!({"name": "openssl", "epoch": 1, "version": "3.0.13", "release": "1.el9"}),
                ),
                true,
            ),
            (
                "rpms has openssl < 3.1",
                rpms(
                    json!({"name": "openssl", "epoch": "(none)", "version": "3.0.13", "release": "1.el9"}),
                ),
                true,
            ),
            (
                "rpms has openssl =~ ^1:3\\.0\\.13-1\\.el9$",
                rpms(
                    json!({"name": "openssl", "epoch": "1", "version": "3.0.13", "release": "1.el9"}),
                ),
                true,
            ),
        ] {
            assert_eq!(p(s).matches("n", &doc), want, "{s} over {doc}");
        }
    }

    #[test]
    fn a_catalog_declares_other_package_plugins() {
        let doc = json!({"_id": "n", "pkgs": [{"name": "foo", "version": "1.10"}, {"name": "bar", "version": "2", "status": "removed"}]});
        let e = p("pkgs has foo > 1.9");
        assert!(
            !e.matches("n", &doc),
            "not a package plugin: 1.10 is the number 1.1"
        );
        let catalog = Catalog::default().with("pkgs", Scheme::Dpkg);
        assert!(e.matches_with("n", &doc, &catalog));
        assert!(
            p("pkgs has bar").matches("n", &doc),
            "status means nothing to other plugins"
        );
        assert!(!p("pkgs has bar").matches_with("n", &doc, &catalog));
        assert!(!p("dpkg has foo").matches_with(
            "n",
            &json!({"dpkg": [{"name": "foo", "status": "deinstall"}]}),
            &catalog
        ));
        assert!(p("dpkg has foo > 1.9").matches_with(
            "n",
            &json!({"dpkg": [{"name": "foo", "version": "1.10"}]}),
            &Catalog::default()
        ));
        assert!(!p("dpkg has foo > 1.9").matches_with(
            "n",
            &json!({"dpkg": [{"name": "foo", "version": "1.10"}]}),
            &Catalog::none()
        ));
    }

    #[test]
    fn bare_paths_read_announced_facts_first_then_plugin_values() {
        let doc = json!({
            "_id": "n",
            "kernel": "Linux 6.1.0 x86_64",
            "os_release": {"VERSION_ID": "12"},
            "vogeler": {"facts": {"kernel": "5.14.0"}},
        });
        assert!(
            p("kernel =~ ^5").matches("n", &doc),
            "the announced fact shadows the plugin"
        );
        assert!(!p("kernel =~ Linux").matches("n", &doc));
        assert!(
            p(".kernel =~ Linux").matches("n", &doc),
            "a leading dot reads the document"
        );
        assert!(p("vogeler.facts.kernel = 5.14.0").matches("n", &doc));
        assert!(
            p("os_release.VERSION_ID = 12").matches("n", &doc),
            "no such fact: the plugin"
        );
        let no_facts = json!({"_id": "n", "kernel": "Linux 6.1.0 x86_64"});
        assert!(
            p("kernel =~ Linux").matches("n", &no_facts),
            "no announced kernel: the plugin"
        );
        assert!(!p("vogeler.facts.kernel =~ Linux").matches("n", &no_facts));
        let odd = json!({"_id": "n", "vogeler": {"facts": "not an object"}, "kernel": "6"});
        assert!(p("kernel = 6").matches("n", &odd));
    }

    /// The node-set table of runner/src/target.rs, over the same registry as documents.
    #[test]
    fn node_sets_keep_their_meaning() {
        let registry = [
            (
                "web01",
                json!({"os": {"family": "Debian"}, "kernel": "6.1.0-18-amd64", "memory_mb": 32000}),
            ),
            (
                "web02",
                json!({"os": {"family": "RedHat"}, "kernel": "5.14.0", "memory_mb": 8000}),
            ),
            (
                "db-1",
                json!({"os": {"family": "Debian"}, "kernel": "6.8.0", "memory_mb": 64000}),
            ),
            (
                "db01",
                json!({"os": {"family": "Debian"}, "kernel": "6.1.0", "memory_mb": 16000}),
            ),
        ];
        let select = |s: &str| -> Vec<&str> {
            let e = p(s);
            let mut out: Vec<&str> = registry
                .iter()
                .filter(|(n, facts)| e.matches(n, &json!({"_id": n, "vogeler": {"facts": facts}})))
                .map(|(n, _)| *n)
                .collect();
            out.sort();
            out
        };
        for (s, want) in [
            ("all", vec!["db-1", "db01", "web01", "web02"]),
            ("web01", vec!["web01"]),
            ("web01,web02,ghost", vec!["web01", "web02"]),
            ("web*", vec!["web01", "web02"]),
            ("db-[0-9]*", vec!["db-1"]),
            ("os.family=Debian", vec!["db-1", "db01", "web01"]),
            ("os.family!=Debian", vec!["web02"]),
            ("kernel=~^6\\.", vec!["db-1", "db01", "web01"]),
            ("(kernel=~^(5|6\\.8))", vec!["db-1", "web02"]),
            ("memory_mb>16000", vec!["db-1", "web01"]),
            ("memory_mb>=16000", vec!["db-1", "db01", "web01"]),
            ("memory_mb<16000", vec!["web02"]),
            ("web* and os.family=Debian", vec!["web01"]),
            (
                "web02 or os.family=Debian and memory_mb>32000",
                vec!["db-1", "web02"],
            ),
            (
                "(web02 or os.family=Debian) and memory_mb>32000",
                vec!["db-1"],
            ),
            ("not os.family=Debian", vec!["web02"]),
            ("all and not db*", vec!["web01", "web02"]),
        ] {
            assert_eq!(select(s), want, "{s}");
        }
        assert_eq!(
            p("web01,ghost or os.family=RedHat").explicit_names(),
            [
                NodeName::new("ghost").expect("n"),
                NodeName::new("web01").expect("n")
            ]
            .into(),
            "named nodes are commanded even when unknown"
        );
        assert!(p("web01 and ghost").explicit_names().is_empty());
        assert!(p("not web01").explicit_names().is_empty());
        assert!(p("all").is_all() && !p("all and web01").is_all());
    }

    #[test]
    fn files_and_stdin_are_read_by_the_caller() {
        let mut read = |s: &Source| match s {
            Source::Stdin => Ok("db01\n\n# comment\nweb02\n".to_string()),
            Source::File(f) if f == "nodes.txt" => Ok("web01\nghost\n".to_string()),
            Source::File(f) => Err(format!("cannot read node names from {f}: no such file")),
        };
        let e = p("@nodes.txt or - and not web02")
            .resolve_sources(&mut read)
            .expect("resolve");
        assert_eq!(e, p("ghost,web01 or db01,web02 and not web02"));
        assert_eq!(
            p("@missing.txt")
                .resolve_sources(&mut read)
                .expect_err("missing")
                .to_string(),
            "cannot read node names from missing.txt: no such file"
        );
        let mut bad = |_: &Source| Ok("_x\n".to_string());
        assert_eq!(
            p("-")
                .resolve_sources(&mut bad)
                .expect_err("bad")
                .to_string(),
            "stdin: node name \"_x\" must start with a letter or digit"
        );
    }

    #[test]
    fn fields_name_only_what_matching_reads() {
        assert_eq!(p("web* or all").fields(), Vec::<String>::new());
        assert_eq!(p("os.family=Debian").fields(), ["os", "vogeler.facts"]);
        assert_eq!(
            p("dpkg has openssl < 3 and disks[].use_percent > 90 or .kernel =~ x").fields(),
            ["disks", "dpkg", "kernel", "vogeler.facts"]
        );
        assert_eq!(
            p("vogeler.plugins.dpkg.outcome = ok").fields(),
            ["vogeler.plugins"]
        );
        assert_eq!(
            p("vogeler.x = 1 or kernel = 1").fields(),
            ["kernel", "vogeler.facts", "vogeler.x"]
        );
        assert_eq!(
            p("vogeler = 1 or kernel = 1").fields(),
            ["kernel", "vogeler"]
        );
        assert_eq!(
            p("not exists disks[].target").fields(),
            ["disks", "vogeler.facts"]
        );
    }

    #[test]
    fn mango_selectors_for_each_construct() {
        let facts_or = |path: &str, cond: Value| json!({"$or": [object(format!("vogeler.facts.{path}"), cond.clone()), object(path.into(), cond)]});
        for (s, want) in [
            ("all", json!({})),
            ("web01,web02", json!({"_id": {"$in": ["web01", "web02"]}})),
            ("web*", json!({"_id": {"$regex": "^web"}})),
            ("db-[0-9]*", json!({"_id": {"$regex": "^db\\-"}})),
            ("*01", json!({})),
            ("@nodes.txt", json!({"_id": {"$exists": false}})),
            (
                "os.family=Debian",
                facts_or("os.family", json!({"$eq": "Debian"})),
            ),
            (
                "memory_mb = 16000",
                facts_or("memory_mb", json!({"$in": ["16000", 16000]})),
            ),
            ("x = true", facts_or("x", json!({"$in": ["true", true]}))),
            (
                "x = 1e300",
                facts_or("x", json!({"$or": [{"$eq": "1e300"}, {"$type": "number"}]})),
            ),
            (
                "x = '[1]'",
                facts_or("x", json!({"$or": [{"$eq": "[1]"}, {"$type": "array"}]})),
            ),
            (
                "memory_mb>16000",
                facts_or("memory_mb", json!({"$gt": 16000})),
            ),
            (
                "memory_mb >= 0.5",
                facts_or("memory_mb", json!({"$gte": 0.5})),
            ),
            (
                "memory_mb<16000",
                facts_or(
                    "memory_mb",
                    json!({"$or": [{"$lt": 16000}, {"$regex": NUMBER_REGEX}]}),
                ),
            ),
            (
                "hostname < m",
                facts_or("hostname", json!({"$exists": true})),
            ),
            (
                "os.family != Debian",
                facts_or("os.family", json!({"$exists": true})),
            ),
            (
                "kernel=~^6\\.",
                facts_or(
                    "kernel",
                    json!({"$or": [{"$regex": "^(?:6\\.)"}, {"$not": {"$type": "string"}}]}),
                ),
            ),
            ("kernel=~.*", facts_or("kernel", json!({"$exists": true}))),
            (
                ".kernel =~ Linux",
                json!({"kernel": {"$or": [{"$regex": "(?:Linux)"}, {"$not": {"$type": "string"}}]}}),
            ),
            (
                "vogeler.facts.kernel = 6",
                json!({"vogeler.facts.kernel": {"$in": ["6", 6]}}),
            ),
            (
                "os_release.VERSION_ID = 12",
                facts_or("os_release.VERSION_ID", json!({"$in": ["12", 12]})),
            ),
            (
                "disks[].use_percent > 90",
                json!({"$or": [
                    {"vogeler.facts.disks": {"$elemMatch": {"use_percent": {"$gt": 90}}}},
                    {"disks": {"$elemMatch": {"use_percent": {"$gt": 90}}}},
                ]}),
            ),
            (
                ".hello[] = beta",
                json!({"hello": {"$elemMatch": {"$eq": "beta"}}}),
            ),
            (
                "exists .os_release.VERSION_ID",
                json!({"os_release.VERSION_ID": {"$exists": true}}),
            ),
            (
                ".dpkg has openssl < 3.0.13",
                json!({"dpkg": {"$elemMatch": {"name": {"$eq": "openssl"}}}}),
            ),
            (
                ".hello has alpha",
                json!({"hello": {"$elemMatch": {"$or": [{"name": {"$eq": "alpha"}}, {"$eq": "alpha"}]}}}),
            ),
            (
                ".dpkg has name=nginx and version=~^1\\.22",
                json!({"dpkg": {"$elemMatch": {"$and": [
                {"name": {"$eq": "nginx"}}, {"version": {"$exists": true}}]}}}),
            ),
            (
                ".dpkg has (name = a or not arch = b)",
                // CouchDB matches no list with `{"$elemMatch": {}}`.
                json!({"dpkg": {"$type": "array"}}),
            ),
            (
                "web* and .x = 1",
                json!({"$and": [{"_id": {"$regex": "^web"}}, {"x": {"$in": ["1", 1]}}]}),
            ),
            (
                "web01 or web02 or .x = 1",
                json!({"$or": [{"_id": {"$in": ["web01"]}}, {"_id": {"$in": ["web02"]}}, {"x": {"$in": ["1", 1]}}]}),
            ),
            ("not web01", json!({"_id": {"$nin": ["web01"]}})),
            ("not all", json!({"_id": {"$exists": false}})),
            ("not .x = 1", json!({})),
            ("not (web01 or .x = 1)", json!({"_id": {"$nin": ["web01"]}})),
            ("not (web01 and .x = 1)", json!({})),
            (
                "web* and not web01",
                json!({"$and": [{"_id": {"$regex": "^web"}}, {"_id": {"$nin": ["web01"]}}]}),
            ),
            ("all or .x = 1", json!({})),
        ] {
            assert_eq!(p(s).mango(), want, "{s}");
        }
    }

    #[test]
    fn regex_hints_are_required_literals() {
        for (re, want) in [
            ("^6\\.", Some("^(?:6\\.)")),
            ("nginx", Some("(?:nginx)")),
            ("^(5|6\\.8)", Some("^(?:5|6\\.8)")),
            ("^ab?c", Some("^(?:abc|ac)")),
            ("a|^b", Some("(?:a|b)")),
            (".*", None),
            ("^\\d", None),
            ("^é", None),
            ("", None),
        ] {
            assert_eq!(regex_hint(re).as_deref(), want, "{re}");
        }
        let folded = regex_hint("(?i)^deb").expect("case-folded literals");
        assert!(
            folded.starts_with("^(?:") && folded.contains("DEB") && folded.contains("deb"),
            "{folded}"
        );
    }

    /// A model of CouchDB's Mango matcher (`mango_selector:match/3` after normalization), for
    /// the operators `mango()` emits: a missing field fails every condition but
    /// `{"$exists": false}`, `$in` looks inside lists, values compare in view collation order.
    fn couch_match(sel: &Value, v: &Value) -> bool {
        let Value::Object(m) = sel else {
            return cmp_json(v, sel).is_eq();
        };
        m.iter().all(|(k, arg)| match k.as_str() {
            "$and" => arg
                .as_array()
                .expect("$and")
                .iter()
                .all(|s| couch_match(s, v)),
            "$or" => arg
                .as_array()
                .expect("$or")
                .iter()
                .any(|s| couch_match(s, v)),
            "$not" => {
                // Only on a value: over a field CouchDB pushes it down (and fails on a missing
                // field), which `mango()` must not rely on.
                let inner = arg.as_object().expect("$not");
                assert!(
                    inner.keys().all(|k| k.starts_with('$')),
                    "$not over a field: {sel}"
                );
                !couch_match(arg, v)
            }
            "$eq" => cmp_json(v, arg).is_eq(),
            "$gt" => cmp_json(v, arg).is_gt(),
            "$gte" => cmp_json(v, arg).is_ge(),
            "$lt" => cmp_json(v, arg).is_lt(),
            "$lte" => cmp_json(v, arg).is_le(),
            "$in" | "$nin" => {
                let args = arg.as_array().expect("$in");
                let found = match v {
                    Value::Array(items) => items
                        .iter()
                        .any(|i| args.iter().any(|a| cmp_json(i, a).is_eq())),
                    _ => args.iter().any(|a| cmp_json(v, a).is_eq()),
                };
                found == (k == "$in")
            }
            "$exists" => arg.as_bool().expect("$exists"),
            "$type" => {
                let t = match v {
                    Value::Null => "null",
                    Value::Bool(_) => "boolean",
                    Value::Number(_) => "number",
                    Value::String(_) => "string",
                    Value::Array(_) => "array",
                    Value::Object(_) => "object",
                };
                arg == t
            }
            "$regex" => v.as_str().is_some_and(|s| {
                Regex::new(arg.as_str().expect("$regex"))
                    .expect("regex")
                    .is_match(s)
            }),
            "$elemMatch" => v
                .as_array()
                .is_some_and(|items| items.iter().any(|e| couch_match(arg, e))),
            op if op.starts_with('$') => panic!("the model does not know {op}"),
            field => {
                let mut cur = Some(v);
                for part in field.split('.') {
                    cur = cur.and_then(|c| c.as_object()).and_then(|o| o.get(part));
                }
                match cur {
                    Some(sub) => couch_match(arg, sub),
                    None => *arg == json!({"$exists": false}),
                }
            }
        })
    }

    /// View collation: null < false < true < numbers < strings < arrays < objects.
    fn cmp_json(a: &Value, b: &Value) -> std::cmp::Ordering {
        use std::cmp::Ordering;
        let rank = |v: &Value| match v {
            Value::Null => 0,
            Value::Bool(false) => 1,
            Value::Bool(true) => 2,
            Value::Number(_) => 3,
            Value::String(_) => 4,
            Value::Array(_) => 5,
            Value::Object(_) => 6,
        };
        match (a, b) {
            (Value::Number(x), Value::Number(y)) => x
                .as_f64()
                .partial_cmp(&y.as_f64())
                .unwrap_or(Ordering::Equal),
            (Value::String(x), Value::String(y)) => x.cmp(y),
            (Value::Array(x), Value::Array(y)) => x
                .iter()
                .zip(y)
                .map(|(i, j)| cmp_json(i, j))
                .find(|o| o.is_ne())
                .unwrap_or_else(|| x.len().cmp(&y.len())),
            (Value::Object(x), Value::Object(y)) => x
                .iter()
                .zip(y)
                .map(|((k1, v1), (k2, v2))| k1.cmp(k2).then_with(|| cmp_json(v1, v2)))
                .find(|o| o.is_ne())
                .unwrap_or_else(|| x.len().cmp(&y.len())),
            _ => rank(a).cmp(&rank(b)),
        }
    }

    /// The document as `_find` returns it with `fields`: only those paths, and `_id`.
    fn project(doc: &Value, fields: &[String]) -> Value {
        let mut out = json!({"_id": doc["_id"].clone()});
        for f in fields {
            let parts: Vec<&str> = f.split('.').collect();
            let mut src = Some(doc);
            for part in &parts {
                src = src.and_then(|s| s.get(part));
            }
            let Some(v) = src else { continue };
            let mut dst = &mut out;
            for part in &parts[..parts.len() - 1] {
                dst = dst
                    .as_object_mut()
                    .expect("object")
                    .entry(part.to_string())
                    .or_insert_with(|| json!({}));
            }
            dst.as_object_mut()
                .expect("object")
                .insert(parts[parts.len() - 1].to_string(), v.clone());
        }
        out
    }

    /// A small deterministic generator (xorshift64*), so a failure names its case.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
            xs[self.below(xs.len())].clone()
        }
        fn chance(&mut self, percent: usize) -> bool {
            self.below(100) < percent
        }
    }

    /// Stored values of every shape: numbers, numeric and other strings, bools, null, lists.
    fn any_value(r: &mut Rng) -> Value {
        r.pick(&[
            json!(32000),
            json!(16000),
            json!(16000.0),
            json!("16000"),
            json!("8000"),
            json!(8000.5),
            json!(-3),
            json!("lots"),
            json!("12"),
            json!("12.0"),
            json!(12),
            json!("93%"),
            json!(93),
            json!(true),
            json!("true"),
            json!(null),
            json!([16000]),
            json!(["16000", "x"]),
            json!({"total": 16000}),
            json!("6.1.0-18-amd64"),
            json!("5.14.0"),
            json!("Linux 6.1.0 x86_64"),
            json!("Debian"),
            json!("RedHat"),
            json!("web01"),
            json!(""),
            json!("1e3"),
            json!(1000),
            json!(6),
            json!("6"),
        ])
    }

    fn maybe(r: &mut Rng, m: &mut Map<String, Value>, k: &str, percent: usize) {
        if r.chance(percent) {
            m.insert(k.into(), any_value(r));
        }
    }

    fn any_package(r: &mut Rng) -> Value {
        let name = r.pick(&["openssl", "nginx", "libssl3", "apache2", "foo"]);
        let version = r.pick(&[
            "3.0.11-1~deb12u2",
            "3.0.13-1",
            "1:0.1",
            "1.22.1-9",
            "1.18.0-6",
            "1.10",
            "1.0~rc1",
            "2.0",
        ]);
        let mut m = Map::new();
        m.insert("name".into(), json!(name));
        if r.chance(95) {
            m.insert("version".into(), json!(version));
        }
        match r.below(4) {
            0 => {}
            1 => {
                m.insert("status".into(), json!("config-files"));
            }
            _ => {
                m.insert("status".into(), json!("installed"));
            }
        }
        if r.chance(20) {
            m.insert("arch".into(), json!(r.pick(&["amd64", "arm64"])));
        }
        Value::Object(m)
    }

    fn any_document(r: &mut Rng, node: &str) -> Value {
        let mut facts = Map::new();
        maybe(r, &mut facts, "kernel", 80);
        maybe(r, &mut facts, "memory_mb", 80);
        maybe(r, &mut facts, "hostname", 50);
        if r.chance(80) {
            let mut os = Map::new();
            maybe(r, &mut os, "family", 80);
            maybe(r, &mut os, "version", 60);
            facts.insert("os".into(), Value::Object(os));
        }
        // Facts that collide with plugin names, to exercise resolution.
        maybe(r, &mut facts, "facts", 10);
        maybe(r, &mut facts, "disks", 5);
        let mut doc = Map::new();
        doc.insert("_id".into(), json!(node));
        if r.chance(90) {
            doc.insert(
                "vogeler".into(),
                json!({"facts": facts, "agent_version": "0.1.0"}),
            );
        }
        maybe(r, &mut doc, "kernel", 40);
        if r.chance(70) {
            let mut f = Map::new();
            maybe(r, &mut f, "memory_mb", 80);
            maybe(r, &mut f, "hostname", 50);
            doc.insert("facts".into(), Value::Object(f));
        }
        if r.chance(70) {
            let mut o = Map::new();
            maybe(r, &mut o, "VERSION_ID", 80);
            doc.insert("os_release".into(), Value::Object(o));
        }
        if r.chance(70) {
            let disks: Vec<Value> = (0..r.below(4))
                .map(|_| {
                    let mut d = Map::new();
                    d.insert("target".into(), json!(r.pick(&["/", "/var", "/boot"])));
                    maybe(r, &mut d, "use_percent", 85);
                    Value::Object(d)
                })
                .collect();
            doc.insert("disks".into(), Value::Array(disks));
        }
        if r.chance(80) {
            let pkgs: Vec<Value> = (0..r.below(6)).map(|_| any_package(r)).collect();
            doc.insert("dpkg".into(), Value::Array(pkgs));
        }
        if r.chance(30) {
            let rpm = r.pick(&[
                json!({"name": "openssl", "version": "3.0.13", "release": "1.el9"}),
                json!({"name": "openssl", "epoch": "1", "version": "3.0.13", "release": "1.el9"}),
                json!({"name": "openssl", "epoch": "(none)", "version": "3.0.7-16.el9"}),
            ]);
            doc.insert("rpms".into(), json!([rpm]));
        }
        if r.chance(40) {
            let hello = r.pick(&[
                json!(["alpha", "beta"]),
                json!(["beta"]),
                json!("alpha"),
                json!([{"name": "alpha"}]),
            ]);
            doc.insert("hello".into(), hello);
        }
        Value::Object(doc)
    }

    const ATOMS: &[&str] = &[
        "all",
        "web01",
        "web*",
        "db*",
        "*1",
        "web01,db-1",
        "kernel=~^6\\.",
        "kernel =~ (?i)^LINUX",
        "kernel =~ '6\\.1|5\\.'",
        "kernel =~ ^(5|6)\\.",
        "kernel = 6",
        "kernel !~ ^5",
        ".kernel =~ Linux",
        "vogeler.facts.kernel =~ ^5",
        "os.family=Debian",
        "os.family != RedHat",
        "os.version = 12",
        "os.version < 13",
        "memory_mb > 16000",
        "memory_mb >= 16000.0",
        "memory_mb < 16001",
        "memory_mb <= 8000.5",
        "memory_mb = 16000",
        "memory_mb = true",
        "memory_mb = null",
        "memory_mb = '[16000]'",
        "memory_mb = '{\"total\":16000}'",
        "memory_mb != lots",
        "memory_mb !~ ^1",
        "memory_mb =~ ^1",
        "memory_mb > lots",
        "memory_mb < lots",
        "memory_mb > -5",
        "memory_mb = 1e3",
        "memory_mb > 1e300",
        "facts.memory_mb < 20000",
        "facts.memory_mb = lots",
        "facts.hostname =~ ^web",
        "hostname = web01",
        "os_release.VERSION_ID = 12",
        "os_release.VERSION_ID > 11",
        "os_release.VERSION_ID = ''",
        "disks[].use_percent > 90",
        "disks[].use_percent < 60",
        "disks[].use_percent =~ %$",
        "disks[].target = /",
        "disks has (target = / and use_percent >= 91)",
        "disks has (not target = / or exists use_percent)",
        "exists disks[].use_percent",
        "exists os.family",
        "exists .kernel",
        "dpkg has openssl",
        "dpkg has openssl < 3.0.13",
        "dpkg has nginx >= 1.20",
        "dpkg has nginx != 1.22.1-9",
        "dpkg has foo > 1.9",
        "dpkg has foo < 1.0",
        "dpkg has name=nginx and version=~^1\\.22",
        "dpkg has (name = apache2 and status = config-files)",
        "dpkg has (name =~ ^ng and not version < 1.20)",
        "dpkg has (arch = amd64 or name = foo)",
        "dpkg[].name = nginx",
        "rpms has openssl = 3.0.13",
        "rpms has openssl > 1:0",
        "hello has alpha",
        "hello[] = beta",
        "hello = alpha",
        "hello has (name = alpha)",
        "_id = web01",
    ];

    fn any_expr(r: &mut Rng, depth: usize) -> String {
        if depth == 0 || r.chance(35) {
            return r.pick(ATOMS).to_string();
        }
        match r.below(4) {
            0 => format!(
                "({}) and ({})",
                any_expr(r, depth - 1),
                any_expr(r, depth - 1)
            ),
            1 => format!(
                "({}) or ({})",
                any_expr(r, depth - 1),
                any_expr(r, depth - 1)
            ),
            2 => format!("not ({})", any_expr(r, depth - 1)),
            _ => format!("{} and {}", r.pick(ATOMS), any_expr(r, depth - 1)),
        }
    }

    /// The narrowing never loses a node: whenever `matches` accepts a document, CouchDB (as
    /// modelled above) accepts it under `mango()`; and `matches` decides the same on the
    /// document cut down to `fields()`.
    #[test]
    fn mango_is_a_superset_of_matches() {
        let mut r = Rng(0x9E37_79B9_7F4A_7C15);
        let (mut cases, mut matched, mut narrowed) = (0, 0, 0);
        for _ in 0..600 {
            let s = any_expr(&mut r, 3);
            let e = p(&s);
            let selector = e.mango();
            let fields = e.fields();
            assert_eq!(parse(&e.to_string()), Ok(e.clone()), "{s} shown as {e}");
            for _ in 0..5 {
                let node = r.pick(&["web01", "web02", "db-1", "db01"]);
                let doc = any_document(&mut r, node);
                let m = e.matches(node, &doc);
                let couch = couch_match(&selector, &doc);
                assert!(!m || couch, "{s}\nselector {selector}\nloses {doc}");
                assert_eq!(
                    e.matches(node, &project(&doc, &fields)),
                    m,
                    "{s}: fields {fields:?} are not enough for {doc}"
                );
                cases += 1;
                matched += usize::from(m);
                narrowed += usize::from(!couch);
            }
        }
        // Not vacuous: many pairs match, and CouchDB leaves many out.
        assert!(matched > cases / 10, "{matched} of {cases} matched");
        assert!(narrowed > cases / 10, "{narrowed} of {cases} narrowed away");
    }

    /// Each atom, and its negation, over many documents: every comparison's narrowing.
    #[test]
    fn each_atom_narrows_safely() {
        let mut r = Rng(42);
        let mut never = vec![];
        for atom in ATOMS {
            let e = p(atom);
            let not = Expr::Not(Box::new(e.clone()));
            let (selector, not_selector) = (e.mango(), not.mango());
            let mut matched = 0;
            for _ in 0..300 {
                let node = r.pick(&["web01", "web02", "db-1", "db01"]);
                let doc = any_document(&mut r, node);
                if e.matches(node, &doc) {
                    matched += 1;
                    assert!(
                        couch_match(&selector, &doc),
                        "{atom}\nselector {selector}\nloses {doc}"
                    );
                }
                if not.matches(node, &doc) {
                    assert!(couch_match(&not_selector, &doc), "not {atom} loses {doc}");
                }
            }
            if matched == 0 {
                never.push(*atom);
            }
        }
        // A comparison reads one value: lists and objects at the path match nothing.
        assert_eq!(
            never,
            [
                "memory_mb = '[16000]'",
                "memory_mb = '{\"total\":16000}'",
                "memory_mb > 1e300"
            ],
            "atoms that never matched"
        );
    }
}
