"""RFC 3261 §25 grammar as small regular expressions.

Each piece names the ABNF rule it follows. The header-value pieces assume the
value has already been unfolded (RFC 3261 §7.3.1): the parser replaces every
CRLF + whitespace by a single SP, so ``LWS`` is plain ``[ \\t]+`` here.

No piece nests quantifiers over overlapping character classes, so matching
stays linear in the input length, which matters on attacker-controlled text.
"""

from __future__ import annotations

import re

# --- §25.1 basic rules ------------------------------------------------------
# LWS = [*WSP CRLF] 1*WSP ; SWS = [LWS]   (values are unfolded already)
LWS = r"[ \t]+"
SWS = r"[ \t]*"

# token = 1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~")
# Note that "%" is a token character, not an escape (RFC 4475 §3.1.1.2).
TOKEN_CHAR = r"[A-Za-z0-9\-.!%*_+`'~]"
TOKEN = rf"{TOKEN_CHAR}+"
TOKEN_RE = re.compile(TOKEN)

# word = 1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~" /
#           "(" / ")" / "<" / ">" / ":" / "\" / DQUOTE / "/" / "[" / "]" / "?" / "{" / "}")
WORD = r"[A-Za-z0-9\-.!%*_+`'~()<>:\\\"/\[\]?{}]+"

# quoted-string = SWS DQUOTE *(qdtext / quoted-pair) DQUOTE
# qdtext        = LWS / %x21 / %x23-5B / %x5D-7E / UTF8-NONASCII
# quoted-pair   = "\" (%x00-09 / %x0B-0C / %x0E-7F)
# Non-ASCII is accepted as-is, including undecodable bytes that the parser
# kept as surrogate escapes.
QDTEXT = r"[\t \x21\x23-\x5b\x5d-\x7e\x80-\U0010ffff]"
QUOTED_PAIR = r"\\[\x00-\x09\x0b\x0c\x0e-\x7f]"
QUOTED_STRING = rf'"(?:{QDTEXT}|{QUOTED_PAIR})*"'
QUOTED_PAIR_RE = re.compile(QUOTED_PAIR)

# --- §25.1 SIP-URI pieces (RFC 3261 §19.1) -----------------------------------
# escaped    = "%" HEXDIG HEXDIG
# unreserved = alphanum / mark ; mark = "-" / "_" / "." / "!" / "~" / "*" / "'" / "(" / ")"
ESCAPED = r"%[0-9A-Fa-f]{2}"
# user = 1*(unreserved / escaped / user-unreserved)
# user-unreserved = "&" / "=" / "+" / "$" / "," / ";" / "?" / "/"
USER = rf"(?:[A-Za-z0-9\-_.!~*'()&=+$,;?/]|{ESCAPED})+"
# password = *(unreserved / escaped / "&" / "=" / "+" / "$" / ",")
PASSWORD = rf"(?:[A-Za-z0-9\-_.!~*'()&=+$,]|{ESCAPED})*"
# userinfo = (user / telephone-subscriber) [":" password] "@"  (the "@" is split off first)
USERINFO_RE = re.compile(rf"({USER})(?::({PASSWORD}))?")

# hostname = *(domainlabel ".") toplabel ["."] — matched loosely (alphanumerics,
# "-" and "."), then checked in code; IPv4address matches this piece too.
HOSTNAME = r"[A-Za-z0-9][A-Za-z0-9\-.]*"
# IPv6reference = "[" IPv6address "]" — the address is checked with ipaddress.
IPV6_REFERENCE = r"\[[0-9A-Fa-f:.]+\]"
HOST = rf"(?:{IPV6_REFERENCE}|{HOSTNAME})"
# port = 1*DIGIT
PORT = r"[0-9]+"

# uri-parameter = pname ["=" pvalue] ; paramchar = param-unreserved / unreserved / escaped
# param-unreserved = "[" / "]" / "/" / ":" / "&" / "+" / "$"
PARAMCHARS = rf"(?:[A-Za-z0-9\-_.!~*'()\[\]/:&+$]|{ESCAPED})+"
URI_PARAM_RE = re.compile(rf"({PARAMCHARS})(?:=({PARAMCHARS}))?")
# header = hname "=" hvalue ; hnv-unreserved = "[" / "]" / "/" / "?" / ":" / "+" / "$"
HNAME = rf"(?:[A-Za-z0-9\-_.!~*'()\[\]/?:+$]|{ESCAPED})+"
HVALUE = rf"(?:[A-Za-z0-9\-_.!~*'()\[\]/?:+$]|{ESCAPED})*"
URI_HEADER_RE = re.compile(rf"({HNAME})=({HVALUE})")

# SIP-URI = "sip:" [userinfo] hostport uri-parameters [headers], after the
# userinfo has been split off at the "@".
HOSTPORT_PARAMS_HEADERS_RE = re.compile(
    rf"""
    ({HOST})                        # host
    (?::({PORT}))?                  # [":" port]
    ((?:;[^;?]*)*)                  # uri-parameters, checked piecewise
    (?:\?(.*))?                     # ["?" headers], checked piecewise
    """,
    re.VERBOSE,
)

# scheme = ALPHA *(ALPHA / DIGIT / "+" / "-" / ".")
SCHEME = r"[A-Za-z][A-Za-z0-9+\-.]*"
# absoluteURI = scheme ":" (hier-part / opaque-part), uric = reserved / unreserved / escaped
URIC = r"[A-Za-z0-9\-_.!~*'()%;/?:@&=+$,\[\]]"
ABSOLUTE_URI = rf"{SCHEME}:{URIC}*"

# --- §25.1 message start lines (RFC 3261 §7.1, §7.2) ------------------------
# SIP-Version = "SIP" "/" 1*DIGIT "." 1*DIGIT   (case-insensitive, §7.1)
SIP_VERSION = r"[Ss][Ii][Pp]/[0-9]+\.[0-9]+"
# Request-Line = Method SP Request-URI SP SIP-Version CRLF
# Method = INVITEm / ... / extension-method ; extension-method = token
# Request-URI = SIP-URI / SIPS-URI / absoluteURI
REQUEST_LINE_RE = re.compile(rf"({TOKEN}) ({ABSOLUTE_URI}) ({SIP_VERSION})")
# Status-Line = SIP-Version SP Status-Code SP Reason-Phrase CRLF
# Status-Code = 3DIGIT ; Reason-Phrase = *(reserved / unreserved / escaped /
#               UTF8-NONASCII / UTF8-CONT / SP / HTAB)
# The SP before an empty Reason-Phrase is tolerated when missing.
STATUS_LINE_RE = re.compile(rf"({SIP_VERSION}) ([1-6][0-9][0-9])(?: (.*))?")

# --- §25.1 header fields (RFC 3261 §7.3) ------------------------------------
# message-header = field-name HCOLON field-value ; HCOLON = *(SP / HTAB) ":" SWS
# The value is stripped in code: a greedy (.*) avoids backtracking on blanks.
HEADER_FIELD_RE = re.compile(rf"({TOKEN}){SWS}:(.*)")

# callid = word ["@" word]
CALL_ID_RE = re.compile(rf"{WORD}(?:@{WORD})?")

# CSeq = "CSeq" HCOLON 1*DIGIT LWS Method
CSEQ_RE = re.compile(rf"([0-9]+){LWS}({TOKEN})")

# 1*DIGIT: Max-Forwards, Content-Length, Expires (delta-seconds), ports.
DIGITS_RE = re.compile(r"[0-9]+")

# generic-param = token [EQUAL gen-value] ; gen-value = token / host / quoted-string
# EQUAL = SWS "=" SWS ; SEMI = SWS ";" SWS. gen-value also takes a bare
# IPv6address, which RFC 3261 §20.42 allows in "received".
GEN_VALUE = rf"(?:{QUOTED_STRING}|[A-Za-z0-9\-.!%*_+`'~:\[\]]+)"
GENERIC_PARAM_RE = re.compile(rf"{SWS};{SWS}({TOKEN})(?:{SWS}={SWS}({GEN_VALUE}))?")

# via-parm = sent-protocol LWS sent-by *(SEMI via-params)
# sent-protocol = protocol-name SLASH protocol-version SLASH transport
# SLASH = SWS "/" SWS ; sent-by = host [COLON port] ; COLON = SWS ":" SWS
VIA_PARM_RE = re.compile(
    rf"""
    ({TOKEN}){SWS}/{SWS}({TOKEN}){SWS}/{SWS}({TOKEN})   # sent-protocol
    {LWS}({HOST})                                       # sent-by host
    (?:{SWS}:{SWS}({PORT}))?                            # [COLON port]
    """,
    re.VERBOSE,
)

# name-addr = [display-name] LAQUOT addr-spec RAQUOT
# display-name = *(token LWS) / quoted-string ; LAQUOT = SWS "<" ; RAQUOT = ">" SWS
# No whitespace is allowed inside the angle brackets (RFC 4475 §3.1.2.15).
NAME_ADDR_RE = re.compile(
    rf"""
    (?:({QUOTED_STRING})|({TOKEN}(?:{LWS}{TOKEN})*))?   # display-name
    {SWS}<({ABSOLUTE_URI})>                             # LAQUOT addr-spec RAQUOT
    """,
    re.VERBOSE,
)
# addr-spec without brackets: it ends at the first ";" (those parameters are
# the header's, §20.10) and may hold no "," or "?".
ADDR_SPEC_RE = re.compile(rf"{SCHEME}:[A-Za-z0-9\-_.!~*'()%/:@&=+$\[\]]*")
