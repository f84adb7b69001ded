//! A tiny parser for the options that follow a command.

use anyhow::{bail, Result};

/// Options parsed from the arguments that follow a command.
///
/// Valued options are accepted as `--name VALUE` or `--name=VALUE`; when one is
/// given twice, the last value wins. Flags take no value.
#[derive(Debug, Default)]
pub struct Options {
    values: Vec<(String, String)>,
    flags: Vec<String>,
}

impl Options {
    /// Parses `args`, accepting only the option names in `valued` and `flags`.
    pub fn parse(args: &[String], valued: &[&str], flags: &[&str]) -> Result<Self> {
        let mut options = Self::default();
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            let (name, inline) = match arg.split_once('=') {
                Some((name, value)) if name.starts_with("--") => (name, Some(value)),
                _ => (arg.as_str(), None),
            };
            if valued.contains(&name) {
                let value = match inline {
                    Some(value) => value.to_owned(),
                    None => match iter.next() {
                        Some(value) => value.clone(),
                        None => bail!("option `{name}` needs a value"),
                    },
                };
                if value.is_empty() {
                    bail!("option `{name}` needs a non-empty value");
                }
                options.values.retain(|(known, _)| known != name);
                options.values.push((name.to_owned(), value));
            } else if flags.contains(&name) && inline.is_none() {
                options.flags.push(name.to_owned());
            } else {
                let accepted: Vec<&str> = valued.iter().chain(flags).copied().collect();
                if accepted.is_empty() {
                    bail!("unexpected argument `{arg}`: this command takes no options");
                }
                bail!(
                    "unexpected argument `{arg}`: this command accepts {}",
                    accepted.join(", ")
                );
            }
        }
        Ok(options)
    }

    /// Returns the value of the valued option `name`, if it was given.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(known, _)| known == name)
            .map(|(_, value)| value.as_str())
    }

    /// Tells whether the flag `name` was given.
    pub fn flag(&self, name: &str) -> bool {
        self.flags.iter().any(|known| known == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|arg| (*arg).to_owned()).collect()
    }

    #[test]
    fn parses_separate_and_inline_values_and_flags() {
        let args = strings(&["--cache", "/a", "--quick", "--out=/b"]);
        let options = Options::parse(&args, &["--cache", "--out"], &["--quick"]).unwrap();
        assert_eq!(options.value("--cache"), Some("/a"));
        assert_eq!(options.value("--out"), Some("/b"));
        assert!(options.flag("--quick"));
        assert_eq!(options.value("--type"), None);
    }

    #[test]
    fn last_value_wins() {
        let args = strings(&["--cache", "/a", "--cache", "/b"]);
        let options = Options::parse(&args, &["--cache"], &[]).unwrap();
        assert_eq!(options.value("--cache"), Some("/b"));
    }

    #[test]
    fn rejects_unknown_options_and_missing_values() {
        let unknown = Options::parse(&strings(&["--nope"]), &["--cache"], &[]).unwrap_err();
        assert!(unknown.to_string().contains("`--nope`"), "{unknown}");
        let missing = Options::parse(&strings(&["--cache"]), &["--cache"], &[]).unwrap_err();
        assert!(missing.to_string().contains("needs a value"), "{missing}");
        let flag_value = Options::parse(&strings(&["--quick=1"]), &[], &["--quick"]);
        assert!(flag_value.is_err());
    }
}
