# RFC 3894: redirect :copy; RFC 5228 2.10.3: the same address only once
require "copy";
redirect :copy "backup@example.net";
redirect :copy "Backup@example.net";
if exists "list-id" {
    redirect "backup@example.net";
}
