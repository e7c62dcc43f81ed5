"""Access control: bearer credentials (JWTs, API keys), grants on stream paths, revocation.

Routes call ``relay.auth.http.authorize(request, action, path)``; see docs/ACCESS.md.
"""
