# RFC 5228 4.3, 4.4: discard then keep: keep wins
if header :contains "subject" "sale" {
    discard;
    stop;
}
if header :contains "subject" "meeting" {
    discard;
    keep;
}
