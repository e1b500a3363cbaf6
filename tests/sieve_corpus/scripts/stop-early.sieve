# RFC 5228 3.3: stop ends the script; the implicit keep still applies
require "fileinto";
if exists "message-id" {
    stop;
}
fileinto "NoMessageId";
