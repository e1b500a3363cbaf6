# RFC 5429 2.2: reject
require "reject";
if header :contains "subject" "sale" {
    reject "No advertising, please.";
}
