# RFC 2047 5, 6.3 and RFC 5228 2.7.2: encoded words that are malformed, glued to text,
# inside quoted strings, or in lower case
require ["fileinto", "variables"];
if header :matches "x-bad-charset" "*" { set "a" "${1}"; fileinto "BadCharset.${a}"; }
if header :contains "x-bad-base64" "tail" { fileinto "BadBase64Tail"; }
if header :is "x-glued" "abcdefghi" { fileinto "GluedDecoded"; }
if header :is "x-glued" "abc=?UTF-8?Q?def?=ghi" { fileinto "GluedRaw"; }
if header :contains "x-quoted" "Quoted word" { fileinto "QuotedDecoded"; }
if header :is "x-lower" "lower case q" { fileinto "LowerCaseQ"; }
