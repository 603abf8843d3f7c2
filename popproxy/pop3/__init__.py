"""The POP3 wire format: pure code, no I/O, no Twisted, tested in memory."""
