# RFC 5228 4.2: redirect cancels the implicit keep
if header :contains "subject" "meeting" {
    redirect "assistant@example.net";
}
if address :is "to" "postmaster@example.org" {
    redirect "admin@example.net";
}
