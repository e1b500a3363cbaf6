# RFC 5228 4.4
if anyof (exists "list-id", header :contains "precedence" "bulk") {
    discard;
}
