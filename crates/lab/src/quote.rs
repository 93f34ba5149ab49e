//! Quoting values into the three languages the lab generates: `postgresql.conf` settings,
//! libpq connection strings, and SQL.

/// A `postgresql.conf` value: single-quoted, with `'` and `\` escaped.
pub(crate) fn conf_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// A value in a libpq `key=value` connection string: single-quoted, with `'` and `\` escaped.
pub(crate) fn conninfo_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// An SQL string literal (standard_conforming_strings is on by default).
pub(crate) fn sql_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// An SQL identifier, always quoted so case and odd characters survive.
pub(crate) fn sql_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_each_language() {
        assert_eq!(conf_value(r"a'b\c"), r"'a''b\\c'");
        assert_eq!(conninfo_value(r"a'b\c"), r"'a\'b\\c'");
        assert_eq!(sql_literal("it's"), "'it''s'");
        assert_eq!(sql_ident(r#"We"ird"#), r#""We""ird""#);
    }
}
