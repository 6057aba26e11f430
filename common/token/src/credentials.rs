//! Finding the token in an `Authorization` header, independently of any
//! HTTP framework.
//!
//! Two forms carry a token:
//!
//! - `Bearer <jwt>`, what Larder's and Attic's clients send;
//! - `Basic base64(user:password)` with the token as the password, what
//!   Nix sends from a netrc entry (`machine host password TOKEN` gives an
//!   empty user). The user is ignored.
//!
//! Anything else is an error, never "no credentials": a client that sent a
//! header meant to authenticate, and a server that quietly treated it as
//! anonymous, would turn a typo into a confusing 404 on a private cache.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

/// Why an `Authorization` header does not carry a usable token. The server
/// answers 401. No variant holds the credentials, so errors can be logged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    #[error("authorization header is empty")]
    Empty,
    #[error("authorization header is not ASCII text")]
    NotText,
    #[error("authorization header has no scheme: send \"Bearer <token>\"")]
    MissingScheme,
    #[error("authorization scheme {scheme} is not supported: send \"Bearer <token>\" or Basic auth with the token as password")]
    UnsupportedScheme { scheme: String },
    #[error("authorization header has nothing after {scheme:?}")]
    MissingCredentials { scheme: &'static str },
    #[error("bearer token contains whitespace")]
    BearerWithWhitespace,
    #[error("basic credentials are not valid base64")]
    BasicNotBase64,
    #[error("basic credentials are not valid UTF-8")]
    BasicNotUtf8,
    #[error("basic credentials have no ':' between user and password")]
    BasicMissingColon,
    #[error("basic credentials have an empty password: the token goes in the password")]
    EmptyToken,
}

/// Extracts the token from the value of an `Authorization` header. Takes
/// bytes (any `AsRef<[u8]>`, such as an `http::HeaderValue` or a `&str`)
/// because header values need not be text.
pub fn parse_authorization(header_value: impl AsRef<[u8]>) -> Result<String, CredentialsError> {
    let value = std::str::from_utf8(header_value.as_ref())
        .ok()
        .filter(|value| value.is_ascii())
        .ok_or(CredentialsError::NotText)?
        .trim();
    if value.is_empty() {
        return Err(CredentialsError::Empty);
    }
    let (scheme, credentials) = match value.split_once(|c: char| c.is_ascii_whitespace()) {
        Some((scheme, credentials)) => (scheme, credentials.trim_start()),
        None => (value, ""),
    };

    // Schemes are case-insensitive (RFC 9110 §11.1).
    if scheme.eq_ignore_ascii_case("bearer") {
        parse_bearer(credentials)
    } else if scheme.eq_ignore_ascii_case("basic") {
        parse_basic(credentials)
    } else if credentials.is_empty() && scheme.contains('.') {
        // A bare JWT (three dot-separated parts): the scheme was forgotten.
        Err(CredentialsError::MissingScheme)
    } else {
        Err(CredentialsError::UnsupportedScheme {
            scheme: describe_scheme(scheme),
        })
    }
}

fn parse_bearer(credentials: &str) -> Result<String, CredentialsError> {
    if credentials.is_empty() {
        return Err(CredentialsError::MissingCredentials { scheme: "Bearer" });
    }
    if credentials.contains(|c: char| c.is_ascii_whitespace()) {
        return Err(CredentialsError::BearerWithWhitespace);
    }
    Ok(credentials.to_owned())
}

fn parse_basic(credentials: &str) -> Result<String, CredentialsError> {
    if credentials.is_empty() {
        return Err(CredentialsError::MissingCredentials { scheme: "Basic" });
    }
    let decoded = STANDARD
        .decode(credentials)
        .map_err(|_| CredentialsError::BasicNotBase64)?;
    let decoded = String::from_utf8(decoded).map_err(|_| CredentialsError::BasicNotUtf8)?;
    // The user cannot contain ':' (RFC 7617 §2), the password can.
    let (_user, password) = decoded
        .split_once(':')
        .ok_or(CredentialsError::BasicMissingColon)?;
    if password.is_empty() {
        return Err(CredentialsError::EmptyToken);
    }
    Ok(password.to_owned())
}

/// The scheme as it may appear in an error message: quoted if it looks like
/// a scheme name, and withheld otherwise, since a client that mangled its
/// header may have put its token where the scheme goes.
fn describe_scheme(scheme: &str) -> String {
    if scheme.len() <= 20 && scheme.bytes().all(|b| b.is_ascii_alphabetic() || b == b'-') {
        format!("{scheme:?}")
    } else {
        "(unrecognised)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JWT: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln";

    fn basic(user_password: &str) -> String {
        format!("Basic {}", STANDARD.encode(user_password))
    }

    #[test]
    fn bearer_tokens() {
        assert_eq!(
            parse_authorization(format!("Bearer {JWT}")).as_deref(),
            Ok(JWT)
        );
        assert_eq!(
            parse_authorization(format!("bearer  {JWT} ")).as_deref(),
            Ok(JWT)
        );
        assert_eq!(
            parse_authorization(format!("BEARER\t{JWT}")).as_deref(),
            Ok(JWT)
        );
        assert_eq!(
            parse_authorization(format!("Bearer {JWT}").as_bytes()).as_deref(),
            Ok(JWT)
        );
    }

    #[test]
    fn basic_password_is_the_token() {
        // What Nix sends for `machine host password TOKEN`.
        assert_eq!(
            parse_authorization(basic(&format!(":{JWT}"))).as_deref(),
            Ok(JWT)
        );
        assert_eq!(
            parse_authorization(basic(&format!("anyone:{JWT}"))).as_deref(),
            Ok(JWT)
        );
        // Only the first colon separates the user.
        assert_eq!(parse_authorization(basic("u:a:b")).as_deref(), Ok("a:b"));
        assert_eq!(
            parse_authorization(format!("basic {}", STANDARD.encode(format!(":{JWT}")))).as_deref(),
            Ok(JWT)
        );
    }

    #[test]
    fn garbage_is_an_error_not_anonymous() {
        use CredentialsError::*;
        let cases: &[(&[u8], CredentialsError)] = &[
            (b"", Empty),
            (b"   ", Empty),
            (b"Bearer", MissingCredentials { scheme: "Bearer" }),
            (b"Bearer   ", MissingCredentials { scheme: "Bearer" }),
            (b"Bearer a b", BearerWithWhitespace),
            (b"Basic", MissingCredentials { scheme: "Basic" }),
            (b"Basic !!!notbase64", BasicNotBase64),
            (b"Basic dXNlcg==", BasicMissingColon), // "user"
            (b"Basic dXNlcjo=", EmptyToken),        // "user:"
            (b"Basic Og==", EmptyToken),            // ":"
            (b"Basic //79", BasicNotUtf8),          // 0xff 0xfe 0xfd
            (b"Bearer \xff", NotText),
            (b"Bearer caf\xc3\xa9", NotText),
            (JWT.as_bytes(), MissingScheme),
            (
                b"Digest username=x",
                UnsupportedScheme {
                    scheme: "\"Digest\"".to_owned(),
                },
            ),
        ];
        for (header, expected) in cases {
            assert_eq!(
                parse_authorization(header).as_ref(),
                Err(expected),
                "header {:?}",
                String::from_utf8_lossy(header)
            );
        }
    }

    #[test]
    fn errors_never_echo_a_token() {
        let error = parse_authorization(format!("{JWT}x {JWT}")).unwrap_err();
        assert_eq!(
            error,
            CredentialsError::UnsupportedScheme {
                scheme: "(unrecognised)".to_owned()
            }
        );
        assert!(!error.to_string().contains("eyJ"));
    }
}
