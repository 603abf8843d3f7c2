"""The two legs of a proxied POP3 session and what joins them."""
