"""Prints an HS256 JWT for the benchmark's gw-full setup: token.py SECRET [ROLE...] (viewer)."""
import base64, hashlib, hmac, json, sys, time

b = lambda d: base64.urlsafe_b64encode(d).rstrip(b"=").decode()
h = b(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
now = int(time.time())
p = b(json.dumps({"sub": "bench", "roles": sys.argv[2:] or ["viewer"], "iss": "b25-auth", "aud": "b25-gateway", "iat": now, "exp": now + 86400}).encode())
s = b(hmac.new(sys.argv[1].encode(), f"{h}.{p}".encode(), hashlib.sha256).digest())
print(f"{h}.{p}.{s}")
