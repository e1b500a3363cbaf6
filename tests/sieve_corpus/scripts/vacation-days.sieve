# RFC 5230 4.1: :days, clamped to the site's maximum
require ["vacation", "fileinto"];
if header :contains "subject" "meeting" {
    vacation :days 3 "Back on Thursday.";
} elsif exists "list-id" {
    vacation :days 1 "Lists get a short period.";
} else {
    vacation :days 365 "A whole year is more than the maximum.";
}
