# RFC 6131: :seconds, clamped to the minimum period
require ["vacation-seconds", "fileinto", "copy"];
if exists "list-id" {
    vacation :seconds 0 "Zero seconds.";
} elsif header :contains "subject" "meeting" {
    vacation :seconds 172800 "Two days in seconds.";
} else {
    vacation :seconds 3600 "One hour, below the minimum.";
}
fileinto :copy "Seen";
