//! Output plumbing: aligned tables, YAML documents, JSON, and writing to stdout.

use std::io::{self, Write as _};

use serde::Serialize;

use super::error::CliError;

/// Left-aligned columns, each as wide as its widest cell, three spaces apart; no
/// trailing spaces. Widths count characters, so `→` is one column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Self {
        Self {
            rows: vec![headers.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        self.render_indented("")
    }

    /// Every line starts with `indent`.
    pub fn render_indented(&self, indent: &str) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|row| row.get(c))
                    .map(|cell| cell.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let mut line = indent.to_owned();
            for (cell, width) in row.iter().zip(&widths) {
                line.push_str(cell);
                let pad = width - cell.chars().count();
                line.extend(std::iter::repeat_n(' ', pad + 3));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `key:  value` lines, values aligned, as `describe` prints them.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(key, value)| format!("{:<width$}  {value}\n", format!("{key}:")))
        .collect()
}

/// One YAML document per value, separated by `---`.
pub fn yaml_documents<T: Serialize>(values: &[T]) -> Result<String, CliError> {
    serde_saphyr::to_string_multiple(values).map_err(|source| CliError::Yaml { source })
}

pub fn yaml<T: Serialize>(value: &T) -> Result<String, CliError> {
    serde_saphyr::to_string(value).map_err(|source| CliError::Yaml { source })
}

/// Pretty JSON with a final newline.
pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<String, CliError> {
    let mut text =
        serde_json::to_string_pretty(value).map_err(|source| CliError::Json { source })?;
    text.push('\n');
    Ok(text)
}

/// Writes to stdout. A closed pipe (`sluicectl get svc | head -1`) is not an error.
pub fn print(text: &str) -> Result<(), CliError> {
    let mut stdout = io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(CliError::Stdout { source: e }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_fit_their_widest_cell() {
        let mut table = Table::new(&["NAME", "PORTS", "X"]);
        table.row(vec!["web".into(), "80/TCP→8080".into(), "1".into()]);
        table.row(vec!["database".into(), "5432/TCP".into(), String::new()]);
        assert_eq!(
            table.render(),
            "\
NAME       PORTS         X
web        80/TCP→8080   1
database   5432/TCP
"
        );
        assert_eq!(
            table.render_indented("  "),
            "  NAME       PORTS         X\n  web        80/TCP→8080   1\n  database   5432/TCP\n"
        );
    }

    #[test]
    fn an_empty_table_is_its_header() {
        let table = Table::new(&["NAME", "ZONE"]);
        assert_eq!(table.render(), "NAME   ZONE\n");
    }

    #[test]
    fn fields_align_their_values() {
        let text = fields(&[("Name", "web".into()), ("Algorithm", "round-robin".into())]);
        assert_eq!(text, "Name:       web\nAlgorithm:  round-robin\n");
    }
}
