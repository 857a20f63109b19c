//! Which proxies may use the proxies' API. Mutual TLS proves a client holds a certificate from
//! `--client-ca`; the allow-list (`--proxy-allow`) then names the proxies by a name in their
//! certificate (a DNS or IP subject alternative name, or the subject's common name), each for
//! every site or only for some. Every request to the proxies' listener is checked, so a
//! certificate the CA issued for something else is refused even though its handshake succeeds.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use x509_parser::extensions::GeneralName;

use crate::error::{ApiError, Error};
use crate::tls::ClientCert;

/// A name a proxy certificate must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Identity {
    /// A DNS subject alternative name (compared without regard to ASCII case).
    Dns(String),
    /// An IP address subject alternative name.
    Ip(IpAddr),
    /// The subject's common name (exactly).
    Cn(String),
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Dns(n) => write!(f, "dns:{n}"),
            Identity::Ip(a) => write!(f, "ip:{a}"),
            Identity::Cn(n) => write!(f, "cn:{n}"),
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    identity: Identity,
    /// None: every site.
    sites: Option<BTreeSet<String>>,
}

/// The proxies allowed on the proxies' API. Empty: any certificate from `--client-ca` (the
/// behaviour before the list existed; the server warns about it at start).
#[derive(Debug, Clone, Default)]
pub(crate) struct AllowList {
    entries: Vec<Entry>,
}

/// A proxy that passed the allow-list, put in the request's extensions.
#[derive(Debug, Clone)]
pub(crate) struct AdmittedProxy {
    /// The entry it matched (`dns:...`), or `any` without a list.
    pub identity: String,
    /// The sites it may validate sessions of; None: every site.
    pub sites: Option<BTreeSet<String>>,
}

impl AdmittedProxy {
    /// Whether this proxy may see a session of `site`.
    pub(crate) fn serves(&self, site: &str) -> bool {
        self.sites.as_ref().is_none_or(|s| s.contains(site))
    }
}

/// The names in a certificate that entries are compared with.
#[derive(Debug, Default)]
struct Names {
    dns: Vec<String>,
    ip: Vec<IpAddr>,
    cn: Vec<String>,
}

fn names(der: &[u8]) -> Result<Names, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unreadable client certificate: {e}"))?;
    let mut n = Names::default();
    for cn in cert.subject().iter_common_name() {
        if let Ok(s) = cn.as_str() {
            n.cn.push(s.to_owned());
        }
    }
    if let Some(san) = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subject alternative names: {e}"))?
    {
        for g in &san.value.general_names {
            match g {
                GeneralName::DNSName(d) => n.dns.push(d.to_ascii_lowercase()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => {
                        n.ip.push(IpAddr::from(<[u8; 4]>::try_from(*b).unwrap_or_default()))
                    }
                    16 => {
                        n.ip.push(IpAddr::from(<[u8; 16]>::try_from(*b).unwrap_or_default()))
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Ok(n)
}

impl AllowList {
    /// Parses `--proxy-allow` values: `dns:NAME`, `ip:ADDRESS` or `cn:COMMON NAME`, each
    /// optionally followed by `@SITE` (repeat the flag for more sites; an identity listed
    /// without a site may serve every site).
    pub(crate) fn parse(specs: &[String]) -> Result<Self, Error> {
        let mut entries: Vec<Entry> = Vec::new();
        for spec in specs {
            let bad = |why: &str| {
                Error::Invalid(format!(
                    "--proxy-allow {spec:?}: {why}; expected dns:NAME, ip:ADDRESS or cn:NAME, \
                     optionally followed by @SITE"
                ))
            };
            let (id, site) = match spec.rsplit_once('@') {
                Some((id, site)) => {
                    crate::store::check_name("--proxy-allow site", site, 64)?;
                    (id, Some(site.to_owned()))
                }
                None => (spec.as_str(), None),
            };
            let (kind, value) = id.split_once(':').ok_or_else(|| bad("no kind"))?;
            if value.is_empty() {
                return Err(bad("empty name"));
            }
            let identity = match kind {
                "dns" => Identity::Dns(value.to_ascii_lowercase()),
                "ip" => Identity::Ip(value.parse().map_err(|_| bad("not an IP address"))?),
                "cn" => Identity::Cn(value.to_owned()),
                _ => return Err(bad("unknown kind")),
            };
            match entries.iter_mut().find(|e| e.identity == identity) {
                Some(e) => match (&mut e.sites, site) {
                    (Some(s), Some(site)) => {
                        s.insert(site);
                    }
                    // Listed for every site once: every site it stays.
                    (s, None) => *s = None,
                    (None, Some(_)) => {}
                },
                None => entries.push(Entry {
                    identity,
                    sites: site.map(|s| BTreeSet::from([s])),
                }),
            }
        }
        Ok(Self { entries })
    }

    /// Whether no proxy is named (any certificate from the CA is admitted).
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Checks a verified client certificate (DER) against the list.
    pub(crate) fn admit(&self, der: &[u8]) -> Result<AdmittedProxy, String> {
        if self.entries.is_empty() {
            return Ok(AdmittedProxy {
                identity: "any".into(),
                sites: None,
            });
        }
        let n = names(der)?;
        let mut admitted: Option<AdmittedProxy> = None;
        for e in &self.entries {
            let hit = match &e.identity {
                Identity::Dns(d) => n.dns.contains(d),
                Identity::Ip(a) => n.ip.contains(a),
                Identity::Cn(c) => n.cn.contains(c),
            };
            if !hit {
                continue;
            }
            // A certificate matching several entries gets the union of their sites.
            admitted = Some(match admitted {
                None => AdmittedProxy {
                    identity: e.identity.to_string(),
                    sites: e.sites.clone(),
                },
                Some(mut a) => {
                    a.sites = match (a.sites, &e.sites) {
                        (Some(mut x), Some(y)) => {
                            x.extend(y.iter().cloned());
                            Some(x)
                        }
                        _ => None,
                    };
                    a
                }
            });
        }
        admitted.ok_or_else(|| {
            format!(
                "the client certificate (CN {:?}, DNS {:?}, IP {:?}) is not on --proxy-allow",
                n.cn, n.dns, n.ip
            )
        })
    }
}

/// Middleware of the proxies' listener: admits a request only from a proxy on the list, and
/// hands the admitted identity to the handlers.
pub(crate) async fn require_allowed(
    State(list): State<Arc<AllowList>>,
    mut req: Request,
    next: Next,
) -> Response {
    let peer = req.extensions().get::<crate::tls::Peer>().map(|p| p.0);
    let Some(cert) = req.extensions().get::<ClientCert>().cloned() else {
        return ApiError::unauthorized("no_client_certificate", "a client certificate is required")
            .into_response();
    };
    match list.admit(&cert.0) {
        Ok(a) => {
            req.extensions_mut().insert(a);
            next.run(req).await
        }
        Err(why) => {
            tracing::warn!(peer = ?peer, reason = %why, "proxy API request refused");
            ApiError::forbidden(
                "proxy_not_allowed",
                "this client certificate is not allowed on the proxies' API",
            )
            .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(cn: &str, sans: &[&str]) -> Vec<u8> {
        let mut p =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let k = rcgen::KeyPair::generate().unwrap();
        p.self_signed(&k).unwrap().der().to_vec()
    }

    #[test]
    fn parse_and_match() {
        let l = AllowList::parse(&[
            "dns:Proxy-A.lan@site-a".into(),
            "dns:proxy-a.lan@site-b".into(),
            "ip:10.0.0.7".into(),
            "cn:edge proxy".into(),
        ])
        .unwrap();
        let a = l.admit(&cert("x", &["proxy-a.lan"])).unwrap();
        assert!(a.serves("site-a") && a.serves("site-b") && !a.serves("main"));
        let b = l.admit(&cert("x", &["10.0.0.7"])).unwrap();
        assert!(b.serves("anything"));
        assert!(l.admit(&cert("edge proxy", &["other.lan"])).is_ok());
        let e = l
            .admit(&cert("edge", &["other.lan", "10.0.0.8"]))
            .unwrap_err();
        assert!(e.contains("not on --proxy-allow"), "{e}");
        assert!(l.admit(b"not a certificate").is_err());
        assert!(AllowList::default().admit(b"whatever").is_ok());
        for bad in ["proxy", "dns:", "url:x", "ip:10.0.0", "dns:a@bad site"] {
            assert!(AllowList::parse(&[bad.into()]).is_err(), "{bad}");
        }
        // Once for every site, always for every site.
        let l = AllowList::parse(&["dns:p@s1".into(), "dns:p".into()]).unwrap();
        assert!(l.admit(&cert("x", &["p"])).unwrap().serves("s9"));
    }
}
