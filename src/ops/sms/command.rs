//! The pure half of SMS commands: the form body as Twilio posts it, the command in
//! a message, the TwiML reply, and how a phone number is shown in audits.

use std::fmt;

/// What a message asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `ACK <alert id>`: silence that alert's repeats.
    Ack(String),
    /// `ROLLBACK`: canary_percent 0.
    Rollback,
    /// `CANARY <0..100>`.
    Percent(u8),
    /// `CANARY ON` / `CANARY OFF`: the kill switch.
    Switch(bool),
    /// `STATUS`.
    Status,
    /// A known command with a bad or missing argument: its label and the reason.
    Invalid(&'static str, String),
    /// Anything else (the reply lists the commands); the reason.
    Help(String),
}

impl Command {
    /// Case-insensitive, surrounding and repeated spaces ignored.
    pub fn parse(body: &str) -> Self {
        let words: Vec<&str> = body.split_whitespace().collect();
        let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
        let upper: Vec<&str> = upper.iter().map(String::as_str).collect();
        match upper.as_slice() {
            ["ACK", _] => Self::Ack(words[1].to_ascii_lowercase()),
            ["ACK"] => Self::Invalid(
                "ack",
                "ACK needs the alert's id, e.g. ACK k7f3q2".to_owned(),
            ),
            ["ROLLBACK"] => Self::Rollback,
            ["CANARY", "ON"] => Self::Switch(true),
            ["CANARY", "OFF"] => Self::Switch(false),
            ["CANARY", n] => match n.parse::<u8>() {
                Ok(p) if p <= 100 => Self::Percent(p),
                _ => Self::Invalid(
                    "canary_percent",
                    format!("CANARY takes 0 to 100, ON or OFF (not {})", words[1]),
                ),
            },
            ["STATUS"] => Self::Status,
            [] => Self::Help("empty message".to_owned()),
            _ => Self::Help(format!("unknown command: {}", words.join(" "))),
        }
    }

    /// The `command` label of `canarygate_sms_commands_total`.
    pub const fn label(&self) -> &'static str {
        match self {
            Self::Ack(_) => "ack",
            Self::Rollback => "rollback",
            Self::Percent(_) => "canary_percent",
            Self::Switch(true) => "canary_on",
            Self::Switch(false) => "canary_off",
            Self::Status => "status",
            Self::Invalid(label, _) => label,
            Self::Help(_) => "help",
        }
    }
}

/// Every `command` label, and the labels for requests that carried none.
pub const COMMAND_LABELS: [&str; 8] = [
    "ack",
    "rollback",
    "canary_percent",
    "canary_on",
    "canary_off",
    "status",
    "help",
    "none",
];

/// The commands, as the help reply lists them.
pub const HELP: &str = "Commands: STATUS | ROLLBACK | CANARY <0-100> | CANARY ON | CANARY OFF | \
                        ACK <alert id>";

/// Why a form body was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedForm(pub String);

impl fmt::Display for MalformedForm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `application/x-www-form-urlencoded`, strictly: `+` is a space, `%` takes two
/// hex digits, the decoded bytes are UTF-8 and every pair has an `=`. (A lenient
/// parser would pass `%zz` on as text, and the signature would be computed over
/// something Twilio never sent.)
pub fn parse_form(body: &[u8]) -> Result<Vec<(String, String)>, MalformedForm> {
    if body.is_empty() {
        return Ok(Vec::new());
    }
    body.split(|b| *b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let at = pair.iter().position(|b| *b == b'=').ok_or_else(|| {
                MalformedForm(format!(
                    "a field without '=': {:?}",
                    String::from_utf8_lossy(pair)
                ))
            })?;
            Ok((decode(&pair[..at])?, decode(&pair[at + 1..])?))
        })
        .collect()
}

fn decode(raw: &[u8]) -> Result<String, MalformedForm> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = |b: Option<&u8>| b.and_then(|b| char::from(*b).to_digit(16));
                let (Some(hi), Some(lo)) = (hex(raw.get(i + 1)), hex(raw.get(i + 2))) else {
                    return Err(MalformedForm(
                        "'%' not followed by two hex digits".to_owned(),
                    ));
                };
                // Two hex digits: at most 255.
                out.push(u8::try_from(hi * 16 + lo).unwrap_or(u8::MAX));
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| MalformedForm("not UTF-8 once decoded".to_owned()))
}

/// `<Response><Message>text</Message></Response>`: Twilio sends `text` back to the
/// sender, so no second API call is needed.
pub fn twiml(text: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Message>{}</Message></Response>",
        xml_text(text)
    )
}

/// `text` as XML 1.0 character data: markup characters escaped, and characters XML
/// cannot carry at all (controls other than tab and newlines, U+FFFE, U+FFFF)
/// replaced by U+FFFD.
pub fn xml_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if c < ' ' || c == '\u{fffe}' || c == '\u{ffff}' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// A number as audits show it: the country prefix and the last four digits
/// (`+1...6789`), enough to tell on-call people apart, not enough to dial.
pub fn masked(number: &str) -> String {
    let chars: Vec<char> = number.chars().collect();
    if chars.len() <= 6 {
        return "(hidden)".to_owned();
    }
    let head: String = chars[..2].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}...{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_case_insensitive_and_ignore_spaces() {
        assert_eq!(Command::parse("  rollback \n"), Command::Rollback);
        assert_eq!(Command::parse("Canary   50"), Command::Percent(50));
        assert_eq!(Command::parse("canary 0"), Command::Percent(0));
        assert_eq!(Command::parse("CANARY 100"), Command::Percent(100));
        assert_eq!(Command::parse("canary off"), Command::Switch(false));
        assert_eq!(Command::parse("Canary On"), Command::Switch(true));
        assert_eq!(Command::parse("status"), Command::Status);
        assert_eq!(
            Command::parse("ack K7F3Q2"),
            Command::Ack("k7f3q2".to_owned())
        );
        for (text, reason) in [
            ("canary 101", "CANARY takes 0 to 100, ON or OFF (not 101)"),
            ("canary -1", "CANARY takes 0 to 100, ON or OFF (not -1)"),
            ("canary 5.5", "CANARY takes 0 to 100, ON or OFF (not 5.5)"),
        ] {
            let parsed = Command::parse(text);
            assert_eq!(
                parsed,
                Command::Invalid("canary_percent", reason.to_owned())
            );
            assert_eq!(parsed.label(), "canary_percent");
        }
        assert_eq!(Command::parse("ack").label(), "ack");
        for (text, reason) in [
            ("", "empty message"),
            ("roll back", "unknown command: roll back"),
            ("status please", "unknown command: status please"),
        ] {
            assert_eq!(
                Command::parse(text),
                Command::Help(reason.to_owned()),
                "{text:?}"
            );
        }
        assert_eq!(Command::parse("canary 7").label(), "canary_percent");
        assert!(COMMAND_LABELS.contains(&Command::parse("x").label()));
    }

    #[test]
    fn forms_are_decoded_strictly() {
        assert_eq!(
            parse_form(b"Body=CANARY+50&From=%2B14155550123&Empty=&Ac%C3%A9=%E2%9C%93").unwrap(),
            vec![
                ("Body".to_owned(), "CANARY 50".to_owned()),
                ("From".to_owned(), "+14155550123".to_owned()),
                ("Empty".to_owned(), String::new()),
                ("Acé".to_owned(), "✓".to_owned()),
            ]
        );
        assert_eq!(parse_form(b"").unwrap(), vec![]);
        assert_eq!(parse_form(b"a=1&&b=2").unwrap().len(), 2);
        for bad in [
            &b"Body=%zz"[..],
            b"Body=%4",
            b"Body",
            b"a=1&b",
            b"Body=%FF%FE",
        ] {
            assert!(
                parse_form(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn twiml_escapes_what_xml_cannot_carry() {
        assert_eq!(
            twiml("a<b>&\"c\" 'd'\u{0}\u{1b}\u{ffff}\n]]>"),
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Message>\
             a&lt;b&gt;&amp;&quot;c&quot; &apos;d&apos;\u{fffd}\u{fffd}\u{fffd}\n]]&gt;\
             </Message></Response>"
        );
    }

    #[test]
    fn numbers_are_masked_in_audits() {
        assert_eq!(masked("+14155556789"), "+1...6789");
        assert_eq!(masked("+44"), "(hidden)");
    }
}
