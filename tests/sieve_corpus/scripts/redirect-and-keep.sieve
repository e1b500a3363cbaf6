# RFC 5228 4.2, 4.3: redirect and an explicit keep
require "imap4flags";
redirect "copy@example.net";
if exists "cc" {
    keep :flags "\\Flagged";
} else {
    keep;
}
