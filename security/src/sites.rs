//! Sites: a named group of users and the proxy URLs their devices are sent to. Here are the rules
//! for a site's name and proxy URLs, the default site (`--default-site`, the site of users who
//! name none), and the checks the admin API makes; the rows are the store's.

use crate::error::{ApiError, Error};
use crate::store::{SiteRow, Store, check_host_port, check_name};

/// Longest site name.
pub(crate) const MAX_NAME: usize = 64;
/// Most proxy URLs one site may list.
pub(crate) const MAX_PROXY_URLS: usize = 64;

/// Checks `--default-site` before anything is created.
pub(crate) fn check_default(name: &str) -> Result<(), Error> {
    check_name("--default-site", name, MAX_NAME)
}

/// Creates the default site if the database lacks it. A read-only standby cannot: it warns,
/// and the primary creates it.
pub(crate) async fn ensure_default(store: &Store, name: &str) -> Result<(), Error> {
    match store.ensure_site(name).await {
        Ok(()) => Ok(()),
        Err(Error::ReadOnly(_)) => {
            tracing::warn!(
                site = %name,
                "the default site is not in the standby's database; it is created at the primary"
            );
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Builds the row an admin asked for, checking its name and proxy URLs.
pub(crate) fn row(name: String, proxy_urls: Vec<String>) -> Result<SiteRow, ApiError> {
    check_name("site name", &name, MAX_NAME)?;
    if proxy_urls.len() > MAX_PROXY_URLS {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!("at most {MAX_PROXY_URLS} proxy URLs"),
        ));
    }
    for u in &proxy_urls {
        check_host_port("proxy URL", u)?;
    }
    Ok(SiteRow { name, proxy_urls })
}

/// Refuses a site the database does not have (a user's site must exist).
pub(crate) async fn require_known(store: &Store, site: &str) -> Result<(), ApiError> {
    if store.site(site).await?.is_none() {
        return Err(ApiError::not_found(
            "unknown_site",
            format!("no site {site}"),
        ));
    }
    Ok(())
}
