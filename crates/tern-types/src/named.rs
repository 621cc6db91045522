//! Enums that travel as words: in the API, in JSON records and in what the
//! CLI prints. Each variant names its word once; `as_str`, `parse`,
//! `Display` and `FromStr` all follow from it.

/// Declares an enum whose variants are written as the given words.
/// Attributes on the enum and its variants pass through (serde names for
/// stored records among them), so a record's JSON need not follow the word.
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $what:literal
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $word:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            /// What the value is called where an error names it.
            pub const WHAT: &'static str = $what;

            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $word, )+
                }
            }

            pub fn parse(s: &str) -> Option<$name> {
                match s {
                    $( $word => Some($name::$variant), )+
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::error::Error;

            /// Refuses an unknown word, listing the known ones.
            fn from_str(s: &str) -> Result<$name, $crate::error::Error> {
                $name::parse(s).ok_or_else(|| {
                    $crate::error::Error::invalid(format!(
                        "{} '{}' must be {}",
                        $what,
                        $crate::text::escaped(s),
                        $crate::named::one_of(&[$($word),+])
                    ))
                })
            }
        }
    };
}

/// "a, b or c".
pub fn one_of(words: &[&str]) -> String {
    match words {
        [] => String::new(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}
