//! Parser for the expression language inside `{{ ... }}`.
//!
//! Grammar (lowest precedence first):
//! ```text
//! expr    := and ("or" and)*
//! and     := not ("and" not)*
//! not     := "not" not | cmp
//! cmp     := pipe (("==" | "!=" | "<" | "<=" | ">" | ">=" | "in" | "not in") pipe)?
//! pipe    := primary ("|" IDENT ("(" args ")")?)*
//! primary := literal | "[" args "]" | IDENT "(" args ")" | path | "(" expr ")"
//! path    := IDENT ("." IDENT | "[" (INT | STRING) "]")*
//! ```
//! Identifiers may contain hyphens, so `stages.fetch-salesforce.output` is one path.
//! FlowMason's spellings are accepted: `upstream.ID.x` is read as `stages.ID.output.x`,
//! and `True`, `False` and `None` as `true`, `false` and `null`.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Literal(Value),
    /// `[a, b, ...]`, for membership tests such as `x in ['Pro', 'Enterprise']`.
    List(Vec<Expr>),
    Path(Path),
    Call {
        name: String,
        args: Vec<Expr>,
    },
    Filter {
        input: Box<Expr>,
        name: String,
        args: Vec<Expr>,
    },
    Compare {
        op: CmpOp,
        left: Box<Expr>,
        right: Box<Expr>,
    },
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    /// Membership: an element of an array, a substring, or a key of an object.
    In,
    NotIn,
}

impl CmpOp {
    pub fn as_str(self) -> &'static str {
        match self {
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
            CmpOp::In => "in",
            CmpOp::NotIn => "not in",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Field(String),
    Index(usize),
}

/// A dotted path such as `stages.fetch-stripe.output.body.items[0]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    pub root: String,
    pub segments: Vec<Segment>,
}

impl Path {
    /// The path written back in template syntax, used in error messages.
    pub fn display_upto(&self, len: usize) -> String {
        let mut out = self.root.clone();
        for seg in &self.segments[..len.min(self.segments.len())] {
            match seg {
                Segment::Field(f) if is_plain_ident(f) => {
                    out.push('.');
                    out.push_str(f);
                }
                Segment::Field(f) => out.push_str(&format!("[{}]", Value::String(f.clone()))),
                Segment::Index(i) => out.push_str(&format!("[{i}]")),
            }
        }
        out
    }
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display_upto(self.segments.len()))
    }
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

fn is_plain_ident(s: &str) -> bool {
    !s.is_empty() && s.chars().all(is_ident_char)
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(Value),
    Dot,
    LBracket,
    RBracket,
    LParen,
    RParen,
    Comma,
    Pipe,
    Cmp(CmpOp),
}

fn lex(src: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = src.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '\t' | '\n' | '\r' => i += 1,
            '.' => {
                toks.push(Tok::Dot);
                i += 1
            }
            '[' => {
                toks.push(Tok::LBracket);
                i += 1
            }
            ']' => {
                toks.push(Tok::RBracket);
                i += 1
            }
            '(' => {
                toks.push(Tok::LParen);
                i += 1
            }
            ')' => {
                toks.push(Tok::RParen);
                i += 1
            }
            ',' => {
                toks.push(Tok::Comma);
                i += 1
            }
            '|' if chars.get(i + 1) == Some(&'|') => {
                return Err("`||` is not supported; use `or`".into());
            }
            '|' => {
                toks.push(Tok::Pipe);
                i += 1
            }
            '=' | '!' | '<' | '>' => {
                let next_eq = chars.get(i + 1) == Some(&'=');
                let op = match (c, next_eq) {
                    ('=', true) => CmpOp::Eq,
                    ('!', true) => CmpOp::Ne,
                    ('<', true) => CmpOp::Le,
                    ('>', true) => CmpOp::Ge,
                    ('<', false) => CmpOp::Lt,
                    ('>', false) => CmpOp::Gt,
                    _ => {
                        return Err(format!(
                            "unexpected `{c}` at offset {i}; did you mean `{c}=`?"
                        ));
                    }
                };
                toks.push(Tok::Cmp(op));
                i += if next_eq { 2 } else { 1 };
            }
            '\'' | '"' => {
                let quote = c;
                let mut s = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err("unterminated string literal".into()),
                        Some('\\') => {
                            let esc = chars.get(i + 1).ok_or("unterminated string literal")?;
                            s.push(match esc {
                                'n' => '\n',
                                't' => '\t',
                                other => *other,
                            });
                            i += 2;
                        }
                        Some(ch) if *ch == quote => {
                            i += 1;
                            break;
                        }
                        Some(ch) => {
                            s.push(*ch);
                            i += 1;
                        }
                    }
                }
                toks.push(Tok::Str(s));
            }
            c if c.is_ascii_digit()
                || (c == '-' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit())) =>
            {
                let start = i;
                i += 1;
                while i < chars.len()
                    && (chars[i].is_ascii_digit() || matches!(chars[i], '.' | 'e' | 'E'))
                {
                    i += 1;
                }
                let text: String = chars[start..i].iter().collect();
                let num: Value =
                    serde_json::from_str(&text).map_err(|_| format!("invalid number `{text}`"))?;
                toks.push(Tok::Num(num));
            }
            c if is_ident_char(c) => {
                let start = i;
                while i < chars.len() && is_ident_char(chars[i]) {
                    i += 1;
                }
                toks.push(Tok::Ident(chars[start..i].iter().collect()));
            }
            other => return Err(format!("unexpected character `{other}` at offset {i}")),
        }
    }
    Ok(toks)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    depth: usize,
}

/// Most tokens in one expression. Bounds the size of the tree, and so the depth of
/// evaluating and dropping it, even for left-nested chains such as `a | f | f | ...`.
pub const MAX_TOKENS: usize = 512;
/// Most nesting of parentheses, calls and `not`, so no input can overflow the stack.
pub const MAX_DEPTH: usize = 32;

/// Parses the text between `{{` and `}}`.
pub fn parse_expr(src: &str) -> Result<Expr, String> {
    let toks = lex(src)?;
    if toks.is_empty() {
        return Err("empty template".into());
    }
    if toks.len() > MAX_TOKENS {
        return Err(format!(
            "expression is too long ({} tokens; the limit is {MAX_TOKENS})",
            toks.len()
        ));
    }
    let mut p = Parser {
        toks,
        pos: 0,
        depth: 0,
    };
    let expr = p.or()?;
    match p.peek() {
        None => Ok(expr),
        Some(t) => Err(format!("unexpected {} after expression", describe(t))),
    }
}

fn describe(t: &Tok) -> String {
    match t {
        Tok::Ident(s) => format!("`{s}`"),
        Tok::Str(s) => format!("string '{s}'"),
        Tok::Num(n) => format!("number {n}"),
        Tok::Dot => "`.`".into(),
        Tok::LBracket => "`[`".into(),
        Tok::RBracket => "`]`".into(),
        Tok::LParen => "`(`".into(),
        Tok::RParen => "`)`".into(),
        Tok::Comma => "`,`".into(),
        Tok::Pipe => "`|`".into(),
        Tok::Cmp(op) => format!("`{}`", op.as_str()),
    }
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }
    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }
    fn eat(&mut self, tok: &Tok) -> bool {
        if self.peek() == Some(tok) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn eat_keyword(&mut self, kw: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Ident(s)) if s == kw) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, tok: Tok) -> Result<(), String> {
        match self.next() {
            Some(t) if t == tok => Ok(()),
            Some(t) => Err(format!(
                "expected {}, found {}",
                describe(&tok),
                describe(&t)
            )),
            None => Err(format!(
                "expected {}, found end of template",
                describe(&tok)
            )),
        }
    }

    fn nested<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, String>) -> Result<T, String> {
        if self.depth >= MAX_DEPTH {
            return Err(format!(
                "expression is nested too deeply (the limit is {MAX_DEPTH})"
            ));
        }
        self.depth += 1;
        let out = f(self);
        self.depth -= 1;
        out
    }

    fn or(&mut self) -> Result<Expr, String> {
        self.nested(Self::or_inner)
    }
    fn or_inner(&mut self) -> Result<Expr, String> {
        let mut left = self.and()?;
        while self.eat_keyword("or") {
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }
    fn and(&mut self) -> Result<Expr, String> {
        let mut left = self.not()?;
        while self.eat_keyword("and") {
            left = Expr::And(Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }
    fn not(&mut self) -> Result<Expr, String> {
        if self.eat_keyword("not") {
            return Ok(Expr::Not(Box::new(self.nested(Self::not)?)));
        }
        self.cmp()
    }
    fn cmp(&mut self) -> Result<Expr, String> {
        let left = self.pipe()?;
        let op = match (self.peek(), self.toks.get(self.pos + 1)) {
            (Some(Tok::Cmp(op)), _) => Some((*op, 1)),
            (Some(Tok::Ident(a)), _) if a == "in" => Some((CmpOp::In, 1)),
            (Some(Tok::Ident(a)), Some(Tok::Ident(b))) if a == "not" && b == "in" => {
                Some((CmpOp::NotIn, 2))
            }
            _ => None,
        };
        if let Some((op, len)) = op {
            self.pos += len;
            let right = self.pipe()?;
            return Ok(Expr::Compare {
                op,
                left: Box::new(left),
                right: Box::new(right),
            });
        }
        Ok(left)
    }
    fn pipe(&mut self) -> Result<Expr, String> {
        let mut expr = self.primary()?;
        while self.eat(&Tok::Pipe) {
            let name = match self.next() {
                Some(Tok::Ident(name)) => name,
                _ => return Err("expected a filter name after `|`".into()),
            };
            let args = if self.eat(&Tok::LParen) {
                self.args()?
            } else {
                Vec::new()
            };
            expr = Expr::Filter {
                input: Box::new(expr),
                name,
                args,
            };
        }
        Ok(expr)
    }
    fn args(&mut self) -> Result<Vec<Expr>, String> {
        let mut args = Vec::new();
        if self.eat(&Tok::RParen) {
            return Ok(args);
        }
        loop {
            args.push(self.or()?);
            if self.eat(&Tok::RParen) {
                return Ok(args);
            }
            self.expect(Tok::Comma)?;
        }
    }
    fn primary(&mut self) -> Result<Expr, String> {
        match self.next() {
            Some(Tok::Str(s)) => Ok(Expr::Literal(Value::String(s))),
            Some(Tok::Num(n)) => Ok(Expr::Literal(n)),
            Some(Tok::LParen) => {
                let e = self.or()?;
                self.expect(Tok::RParen)?;
                Ok(e)
            }
            Some(Tok::LBracket) => {
                let mut items = Vec::new();
                if self.eat(&Tok::RBracket) {
                    return Ok(Expr::List(items));
                }
                loop {
                    items.push(self.or()?);
                    if self.eat(&Tok::RBracket) {
                        return Ok(Expr::List(items));
                    }
                    self.expect(Tok::Comma)?;
                }
            }
            Some(Tok::Ident(name)) => match name.as_str() {
                "true" | "True" => Ok(Expr::Literal(Value::Bool(true))),
                "false" | "False" => Ok(Expr::Literal(Value::Bool(false))),
                "null" | "None" => Ok(Expr::Literal(Value::Null)),
                _ if self.eat(&Tok::LParen) => Ok(Expr::Call {
                    name,
                    args: self.args()?,
                }),
                _ => self.path(name),
            },
            Some(t) => Err(format!("unexpected {}", describe(&t))),
            None => Err("unexpected end of template".into()),
        }
    }
    fn path(&mut self, root: String) -> Result<Expr, String> {
        let mut segments = Vec::new();
        loop {
            if self.eat(&Tok::Dot) {
                match self.next() {
                    Some(Tok::Ident(f)) => segments.push(Segment::Field(f)),
                    // `x.0` reads naturally for array elements.
                    Some(Tok::Num(Value::Number(n))) if n.is_u64() => {
                        segments.push(Segment::Index(n.as_u64().unwrap_or_default() as usize))
                    }
                    _ => {
                        return Err(format!(
                            "expected a field name after `{}.`",
                            display(&root, &segments)
                        ));
                    }
                }
            } else if self.eat(&Tok::LBracket) {
                match self.next() {
                    Some(Tok::Num(Value::Number(n))) if n.is_u64() => {
                        segments.push(Segment::Index(n.as_u64().unwrap_or_default() as usize))
                    }
                    Some(Tok::Str(s)) => segments.push(Segment::Field(s)),
                    _ => {
                        return Err(format!(
                            "expected an index or a quoted key after `{}[`",
                            display(&root, &segments)
                        ));
                    }
                }
                self.expect(Tok::RBracket)?;
            } else {
                break;
            }
        }
        if root == "upstream" {
            // FlowMason's `upstream.ID.x` is `stages.ID.output.x`.
            let (root, segments) = match segments.first() {
                Some(Segment::Field(_)) => {
                    segments.insert(1, Segment::Field("output".into()));
                    ("stages".to_string(), segments)
                }
                _ => return Err("expected `upstream.ID`".into()),
            };
            return Ok(Expr::Path(Path { root, segments }));
        }
        Ok(Expr::Path(Path { root, segments }))
    }
}

fn display(root: &str, segments: &[Segment]) -> String {
    Path {
        root: root.to_string(),
        segments: segments.to_vec(),
    }
    .to_string()
}

impl Expr {
    /// Every path this expression reads, for static checks.
    pub fn paths<'a>(&'a self, out: &mut Vec<&'a Path>) {
        match self {
            Expr::Literal(_) => {}
            Expr::List(items) => items.iter().for_each(|a| a.paths(out)),
            Expr::Path(p) => out.push(p),
            Expr::Call { args, .. } => args.iter().for_each(|a| a.paths(out)),
            Expr::Filter { input, args, .. } => {
                input.paths(out);
                args.iter().for_each(|a| a.paths(out));
            }
            Expr::Compare { left, right, .. } | Expr::And(left, right) | Expr::Or(left, right) => {
                left.paths(out);
                right.paths(out);
            }
            Expr::Not(e) => e.paths(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hyphenated_stage_ids_are_one_path() {
        let e = parse_expr("stages.fetch-salesforce.output.x[0].y").unwrap();
        let Expr::Path(p) = e else {
            panic!("not a path: {e:?}")
        };
        assert_eq!(p.root, "stages");
        assert_eq!(
            p.segments,
            vec![
                Segment::Field("fetch-salesforce".into()),
                Segment::Field("output".into()),
                Segment::Field("x".into()),
                Segment::Index(0),
                Segment::Field("y".into()),
            ]
        );
    }

    #[test]
    fn comparison_filters_and_calls() {
        assert!(matches!(
            parse_expr("output.status_code == 429").unwrap(),
            Expr::Compare { op: CmpOp::Eq, .. }
        ));
        assert!(matches!(
            parse_expr("stages.a.output | tojson").unwrap(),
            Expr::Filter { .. }
        ));
        assert!(matches!(parse_expr("now()").unwrap(), Expr::Call { .. }));
        assert!(parse_expr("a ==").is_err());
        assert!(parse_expr("a = 1").unwrap_err().contains("did you mean"));
    }

    #[test]
    fn flowmason_spellings() {
        assert_eq!(
            parse_expr("upstream.fetch-data.body").unwrap(),
            parse_expr("stages.fetch-data.output.body").unwrap()
        );
        assert!(matches!(
            parse_expr("'x' not in input.tags").unwrap(),
            Expr::Compare {
                op: CmpOp::NotIn,
                ..
            }
        ));
        assert!(matches!(
            parse_expr("len(input.text) > 1000 and not input.flag").unwrap(),
            Expr::And(..)
        ));
        assert_eq!(parse_expr("None").unwrap(), Expr::Literal(Value::Null));
    }
}
