//! A real OpenLDAP slapd for the directory tests: a slapd.conf and a small LDIF written to a temp
//! dir, loaded with slapadd, served on a loopback port. A watchdog shell stops slapd when the
//! test drops the handle or the test process dies.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{free_port, skip};

pub const BASE: &str = "dc=example,dc=org";
pub const ROOT_DN: &str = "cn=admin,dc=example,dc=org";
pub const ROOT_PW: &str = "root-secret";

const LDIF: &str = "\
dn: dc=example,dc=org
objectClass: dcObject
objectClass: organization
o: Example
dc: example

dn: ou=people,dc=example,dc=org
objectClass: organizationalUnit
ou: people

dn: ou=groups,dc=example,dc=org
objectClass: organizationalUnit
ou: groups

dn: uid=carol,ou=people,dc=example,dc=org
objectClass: inetOrgPerson
uid: carol
cn: Carol
sn: C
userPassword: carol-pw

dn: uid=dave,ou=people,dc=example,dc=org
objectClass: inetOrgPerson
uid: dave
cn: Dave
sn: D
userPassword: dave-pw

dn: cn=staff,ou=groups,dc=example,dc=org
objectClass: groupOfNames
cn: staff
member: uid=carol,ou=people,dc=example,dc=org

dn: cn=ops,ou=groups,dc=example,dc=org
objectClass: groupOfNames
cn: ops
member: uid=carol,ou=people,dc=example,dc=org
member: uid=dave,ou=people,dc=example,dc=org
";

pub struct Slapd {
    pub url: String,
    pub dir: tempfile::TempDir,
    alive: PathBuf,
    child: Child,
    /// `ldaps://127.0.0.1:PORT` when started with TLS.
    pub ldaps_url: Option<String>,
}

fn find(name: &str) -> Option<PathBuf> {
    [
        "/usr/sbin",
        "/usr/bin",
        "/usr/local/sbin",
        "/usr/local/libexec",
    ]
    .iter()
    .map(|d| PathBuf::from(d).join(name))
    .find(|p| p.exists())
}

impl Slapd {
    /// Starts slapd with the test directory, or skips loudly (fails under CI).
    pub fn start() -> Option<Slapd> {
        Self::start_with(None, None)
    }

    /// Starts slapd answering at most `limit` entries to a search that is not paged, and pages
    /// of at most `limit` (as Active Directory's MaxPageSize does, 1000 there); a paged search
    /// may return any total. The root DN is exempt from limits: search as someone else.
    pub fn start_size_limited(limit: usize) -> Option<Slapd> {
        Self::start_with(None, Some(limit))
    }

    /// Starts slapd serving TLS too (StartTLS on `url`, and `ldaps_url`) with the certificate
    /// and key `(cert, key)`.
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> Option<Slapd> {
        Self::start_with(Some((cert, key)), None)
    }

    fn start_with(
        tls: Option<(&std::path::Path, &std::path::Path)>,
        size_limit: Option<usize>,
    ) -> Option<Slapd> {
        let (Some(slapd), Some(slapadd)) = (find("slapd"), find("slapadd")) else {
            skip(
                "slapd",
                "no /usr/sbin/slapd or slapadd (apt install slapd ldap-utils)",
            );
            return None;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("db");
        std::fs::create_dir_all(&db).expect("db dir");
        let conf = dir.path().join("slapd.conf");
        let modules = [
            "/usr/lib/ldap",
            "/usr/lib/x86_64-linux-gnu/ldap",
            "/usr/lib64/openldap",
        ]
        .into_iter()
        .find(|d| {
            PathBuf::from(d).join("back_mdb.la").exists()
                || PathBuf::from(d).join("back_mdb.so").exists()
        });
        let module_lines = modules
            .map(|m| format!("modulepath {m}\nmoduleload back_mdb\n"))
            .unwrap_or_default();
        let tls_lines = tls
            .map(|(c, k)| {
                format!(
                    "TLSCertificateFile {}\nTLSCertificateKeyFile {}\n",
                    c.display(),
                    k.display()
                )
            })
            .unwrap_or_default();
        let limit_lines = size_limit
            .map(|n| {
                format!(
                    "sizelimit size.soft={n} size.hard={n} size.pr={n} size.prtotal=unlimited\n"
                )
            })
            .unwrap_or_default();
        std::fs::write(
            &conf,
            format!(
                "include /etc/ldap/schema/core.schema\n\
                 include /etc/ldap/schema/cosine.schema\n\
                 include /etc/ldap/schema/inetorgperson.schema\n\
                 {module_lines}\
                 {tls_lines}\
                 {limit_lines}\
                 pidfile {dir}/slapd.pid\n\
                 database mdb\n\
                 maxsize 10485760\n\
                 suffix \"{BASE}\"\n\
                 rootdn \"{ROOT_DN}\"\n\
                 rootpw {ROOT_PW}\n\
                 directory {db}\n",
                dir = dir.path().display(),
                db = db.display(),
            ),
        )
        .expect("slapd.conf");
        let ldif = dir.path().join("data.ldif");
        std::fs::write(&ldif, LDIF).expect("ldif");
        let out = Command::new(&slapadd)
            .arg("-f")
            .arg(&conf)
            .arg("-l")
            .arg(&ldif)
            .output()
            .expect("slapadd runs");
        if !out.status.success() {
            let why = format!("slapadd failed: {}", String::from_utf8_lossy(&out.stderr));
            skip("slapd", &why);
            return None;
        }
        let port = free_port();
        let url = format!("ldap://127.0.0.1:{port}");
        let tls_port = tls.map(|_| free_port());
        let ldaps_url = tls_port.map(|p| format!("ldaps://127.0.0.1:{p}"));
        let listen = match &ldaps_url {
            Some(s) => format!("'{url}/ {s}/'"),
            None => format!("{url}/"),
        };
        let alive = dir.path().join("alive");
        std::fs::write(&alive, "").expect("alive file");
        let script = format!(
            "{slapd} -f {conf} -h {listen} -d 0 >{dir}/log 2>&1 & pid=$!; \
             while [ -d /proc/{me} ] && [ -e {alive} ]; do sleep 0.2; done; kill $pid; wait $pid",
            slapd = slapd.display(),
            conf = conf.display(),
            dir = dir.path().display(),
            me = std::process::id(),
            alive = alive.display(),
        );
        let child = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sh");
        let deadline = Instant::now() + Duration::from_secs(15);
        let up = |p: u16| std::net::TcpStream::connect(("127.0.0.1", p)).is_ok();
        while !up(port) || tls_port.is_some_and(|p| !up(p)) {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
                panic!("slapd did not start: {log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(Slapd {
            url,
            dir,
            alive,
            child,
            ldaps_url,
        })
    }

    /// Runs an ldap-utils tool (ldapadd, ldapdelete) as the root DN.
    pub fn tool(&self, tool: &str, args: &[&str], stdin: Option<&str>) {
        use std::io::Write as _;
        let mut c = Command::new(tool)
            .args(["-x", "-H", &self.url, "-D", ROOT_DN, "-w", ROOT_PW])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{tool}: {e} (apt install ldap-utils)"));
        if let Some(s) = stdin {
            c.stdin
                .take()
                .expect("stdin")
                .write_all(s.as_bytes())
                .expect("write");
        }
        drop(c.stdin.take());
        let out = c.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "{tool}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.alive);
        let _ = self.child.wait();
    }
}
