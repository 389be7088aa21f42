//! How the demo prints: numbered steps, indented tool output, and the agent's
//! log lines without their timestamps and colours.

use sluice_tests::Agent;

pub(crate) fn step(n: &str, what: &str) {
    println!("\n== {n}. {what}");
}

pub(crate) fn print_last_log_line(agent: &Agent, needle: &str, node: &str) {
    if let Some(line) = agent.log().lines().rev().find(|l| l.contains(needle)) {
        println!("   {node}: {}", agent_said(line));
    }
}

pub(crate) fn print_log_lines(agent: &Agent, needle: &str) {
    print_log_lines_of(agent, needle, "agent");
}

/// The agent's log lines with `needle`, each labelled `who`.
pub(crate) fn print_log_lines_of(agent: &Agent, needle: &str, who: &str) {
    for line in agent.log().lines().filter(|l| l.contains(needle)) {
        println!("   {who}: {}", agent_said(line));
    }
}

/// A log line without its timestamp, level and target: what the agent said.
fn agent_said(line: &str) -> String {
    let text = strip_ansi(line);
    text.split_once(": ")
        .map_or(text.clone(), |(_, rest)| rest.to_owned())
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub(crate) fn indent(text: &str) -> String {
    indent_by(text, "   ")
}

pub(crate) fn indent_by(text: &str, prefix: &str) -> String {
    text.lines().map(|l| format!("{prefix}{l}\n")).collect()
}
