"""Hooks: code that sees the traffic. Session hooks observe events; message hooks see (and may rewrite)
each retrieved message. The contract is in ``interfaces``; ``docs/hooks.md`` shows how to write one."""
