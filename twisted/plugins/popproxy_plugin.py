"""twistd plugin: ``twistd popproxy``. Kept tiny so that ``twistd --help`` never imports popproxy."""

from twisted.application.service import ServiceMaker

popproxy = ServiceMaker(
    "popproxy",
    "popproxy.tap",
    "POP3 proxy: STLS and implicit TLS on both legs, routing per user, message hooks.",
    "popproxy",
)
