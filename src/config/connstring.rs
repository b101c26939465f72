//! Connection strings as tokio-postgres reads them (a `postgres://` URL or
//! `key=value` pairs): taking out the TLS keys pqmig handles itself, and
//! hiding passwords for display.

use zeroize::Zeroizing;

/// Replace every password in a connection string with `***`: the userinfo
/// of a `postgres://user:pass@host` URL, a `password=` query parameter, or
/// the `password` key of a key/value string. Errs on the side of hiding
/// more: everything between the first `:` of the userinfo and the *last*
/// `@` goes, so a password holding an unescaped `@`, `/` or `?` is hidden
/// too. A string that cannot be parsed is hidden whole.
pub fn redact_url(url: &str) -> String {
    if let Some(rest) = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
    {
        let scheme = &url[..url.len() - rest.len()];
        let mut out = String::from(scheme);
        let mut tail = rest;
        if let Some(at) = rest.rfind('@')
            && let Some(colon) = rest[..at].find(':')
        {
            out.push_str(&rest[..colon]);
            out.push_str(":***");
            tail = &rest[at..];
        }
        // Query parameters after the (last) `@`, if any.
        match tail.find('?') {
            Some(q) => {
                out.push_str(&tail[..=q]);
                let params: Vec<String> = tail[q + 1..]
                    .split('&')
                    .map(|p| match p.split_once('=') {
                        Some((k, _)) if decode(k).is_ok_and(|k| k == "password") => {
                            format!("{k}=***")
                        }
                        _ => p.to_owned(),
                    })
                    .collect();
                out.push_str(&params.join("&"));
            }
            None => out.push_str(tail),
        }
        return out;
    }
    match kv_params(url) {
        Ok(params) => params
            .iter()
            .map(|p| {
                if p.key == "password" {
                    "password=***".to_owned()
                } else {
                    url[p.span.0..p.span.1].to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
        Err(_) => "<unparsable connection string>".to_owned(),
    }
}

/// A connection string with the TLS parameters that tokio-postgres does
/// not understand (`sslmode=verify-*`, `sslrootcert`) taken out.
pub struct ConnString {
    /// The rest, for `tokio_postgres::Config::from_str`.
    pub rest: Zeroizing<String>,
    pub sslmode: Option<String>,
    pub sslrootcert: Option<String>,
    /// Every parameter the string names (e.g. `application_name`), so that
    /// pqmig's defaults never override what the operator wrote.
    pub keys: Vec<String>,
}

impl ConnString {
    pub fn names(&self, key: &str) -> bool {
        self.keys.iter().any(|k| k == key)
    }
}

/// Split a URL (`postgres://…?k=v&…`) or key/value string (`k=v k='v w'`)
/// the way tokio-postgres reads it. Errors never quote the input.
pub fn split_conn_string(s: &str) -> Result<ConnString, String> {
    let mut out = ConnString {
        rest: Zeroizing::new(String::new()),
        sslmode: None,
        sslrootcert: None,
        keys: Vec::new(),
    };
    if let Some(after_scheme) = s
        .strip_prefix("postgres://")
        .or_else(|| s.strip_prefix("postgresql://"))
    {
        let scheme_len = s.len() - after_scheme.len();
        // tokio-postgres takes credentials up to the first `@` anywhere.
        let creds_end = after_scheme.find('@').map_or(0, |i| i + 1);
        let Some(q) = after_scheme[creds_end..]
            .find('?')
            .map(|i| scheme_len + creds_end + i)
        else {
            out.rest.push_str(s);
            return Ok(out);
        };
        let mut kept: Vec<&str> = Vec::new();
        for part in s[q + 1..].split('&').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            let key = decode(k)?;
            match key.as_str() {
                "sslmode" => out.sslmode = Some(decode(v)?),
                "sslrootcert" => out.sslrootcert = Some(decode(v)?),
                _ => {
                    out.keys.push(key);
                    kept.push(part);
                }
            }
        }
        out.rest.push_str(&s[..q]);
        if !kept.is_empty() {
            out.rest.push('?');
            out.rest.push_str(&kept.join("&"));
        }
        return Ok(out);
    }
    let mut kept: Vec<&str> = Vec::new();
    for p in kv_params(s)? {
        match p.key.as_str() {
            "sslmode" => out.sslmode = Some(p.value.to_string()),
            "sslrootcert" => out.sslrootcert = Some(p.value.to_string()),
            _ => {
                out.keys.push(p.key.clone());
                kept.push(&s[p.span.0..p.span.1]);
            }
        }
    }
    out.rest.push_str(&kept.join(" "));
    Ok(out)
}

fn decode(s: &str) -> Result<String, String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| "a percent-encoded parameter is not UTF-8".to_owned())
}

struct KvParam {
    key: String,
    value: Zeroizing<String>,
    /// Byte range of `key = value` in the input.
    span: (usize, usize),
}

/// Tokenise `key = value key2 = 'quoted \' value'` like tokio-postgres.
fn kv_params(s: &str) -> Result<Vec<KvParam>, String> {
    let mut params = Vec::new();
    let mut it = s.char_indices().peekable();
    let skip_ws = |it: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
        while it.next_if(|(_, c)| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_ws(&mut it);
        let Some(&(start, _)) = it.peek() else { break };
        let mut key = String::new();
        while let Some((_, c)) = it.next_if(|(_, c)| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        skip_ws(&mut it);
        if it.next().map(|(_, c)| c) != Some('=') {
            // Not quoting the word: it may be half of a password.
            return Err(format!(
                "expected `=` after a parameter name (at byte {start})"
            ));
        }
        skip_ws(&mut it);
        let mut value = Zeroizing::new(String::new());
        let end;
        if it.next_if(|(_, c)| *c == '\'').is_some() {
            loop {
                match it.next() {
                    Some((i, '\'')) => {
                        end = i + 1;
                        break;
                    }
                    Some((_, '\\')) => {
                        if let Some((_, c)) = it.next() {
                            value.push(c);
                        }
                    }
                    Some((_, c)) => value.push(c),
                    None => return Err("unterminated quoted parameter value".into()),
                }
            }
        } else {
            let mut last = s.len();
            loop {
                match it.peek() {
                    Some(&(i, c)) if c.is_whitespace() => {
                        last = i;
                        break;
                    }
                    Some(&(_, '\\')) => {
                        it.next();
                        if let Some((_, c)) = it.next() {
                            value.push(c);
                        }
                    }
                    Some(&(_, c)) => {
                        value.push(c);
                        it.next();
                    }
                    None => break,
                }
            }
            end = last;
        }
        params.push(KvParam {
            key,
            value,
            span: (start, end),
        });
    }
    Ok(params)
}
