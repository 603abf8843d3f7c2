"""Test support code: real-server fixtures (Dovecot) and generated mail."""
