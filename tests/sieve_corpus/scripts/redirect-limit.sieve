# a site limit of 4 redirects (Limits.max_redirects, sieve_max_redirects)
redirect "r1@example.net";
redirect "r2@example.net";
redirect "r3@example.net";
redirect "r4@example.net";
if exists "list-id" {
    redirect "r5@example.net";
}
