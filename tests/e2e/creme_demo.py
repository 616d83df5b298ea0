"""Helper of tests/e2e/creme-demo.sh (runs with the Python of tests/e2e/.venv,
whose `cryptography` comes with Creme).

    creme_demo.py init DIR           CA, server certificate, JWT key and JWKS in DIR
    creme_demo.py serve DIR PORT URL a page on 127.0.0.1:PORT that hands the
                                     browser a JWT cookie for a role, then
                                     sends it to the gateway at URL

Demo only: the "identity provider" here signs a token for whoever clicks.
"""
import base64
import datetime
import http.server
import json
import sys
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ISSUER = "https://idp.demo.invalid/realms/crm"
COOKIE = "rempart_token"
ROLES = {
    "sales": "sales: lists, opens, creates contacts; may not delete or export",
    "dpo": "dpo: reads and bulk-exports (CSV) contacts",
    "admin": "admin: everything but bulk export (that is the DPO's)",
}


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def pem(path, obj, private=False):
    if private:
        data = obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    else:
        data = obj.public_bytes(serialization.Encoding.PEM)
    Path(path).write_bytes(data)


def init(d):
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rempart demo CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem(d / "ca.pem", ca)
    pem(d / "cert.pem", cert)
    pem(d / "key.pem", key, private=True)
    signing = ec.generate_private_key(ec.SECP256R1())
    pem(d / "jwt-signing-key.pem", signing, private=True)
    nums = signing.public_key().public_numbers()
    jwks = {"keys": [{"kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": "demo",
                      "x": b64(nums.x.to_bytes(32, "big")), "y": b64(nums.y.to_bytes(32, "big"))}]}
    (d / "jwks.json").write_text(json.dumps(jwks))


def token(d, role):
    key = serialization.load_pem_private_key((Path(d) / "jwt-signing-key.pem").read_bytes(), None)
    now = int(time.time())
    header = {"alg": "ES256", "typ": "JWT", "kid": "demo"}
    claims = {"iss": ISSUER, "aud": "crm", "sub": role + "-demo", "name": role.title() + " (demo)",
              "roles": [role], "iat": now, "exp": now + 8 * 3600}
    signing_input = (b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())).encode()
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    return signing_input.decode() + "." + b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def serve(d, port, gateway):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            role = self.path.removeprefix("/as/")
            if role in ROLES:
                self.send_response(302)
                # Cookies are per host, not per port: the gateway on
                # 127.0.0.1 receives it.
                self.send_header("Set-Cookie", "%s=%s; Path=/; SameSite=Lax" % (COOKIE, token(d, role)))
                self.send_header("Location", gateway + "/creme_login/")
                self.end_headers()
                return
            items = "".join('<li><a href="/as/%s">%s</a> (Creme login: %s / %s-pass)</li>'
                            % (r, text, r, r) for r, text in ROLES.items())
            body = ("<!doctype html><title>rempart demo</title><h1>rempart in front of Creme CRM</h1>"
                    "<p>Pick who you are (a demo identity provider hands your browser a signed JWT "
                    "cookie), then log in to Creme with the same name.</p><ul>%s</ul>"
                    "<p>Without a token the gateway answers 403: try <a href='%s/persons/contacts'>%s</a>"
                    " in a private window.</p>" % (items, gateway, gateway)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    http.server.ThreadingHTTPServer(("127.0.0.1", int(port)), Handler).serve_forever()


if __name__ == "__main__":
    if sys.argv[1] == "init":
        init(sys.argv[2])
    elif sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(__doc__)
