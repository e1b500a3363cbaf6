# a site limit of 32 actions (Limits.max_actions, sieve_max_actions)
require ["fileinto", "copy"];
fileinto :copy "F01"; fileinto :copy "F02"; fileinto :copy "F03"; fileinto :copy "F04";
fileinto :copy "F05"; fileinto :copy "F06"; fileinto :copy "F07"; fileinto :copy "F08";
fileinto :copy "F09"; fileinto :copy "F10"; fileinto :copy "F11"; fileinto :copy "F12";
fileinto :copy "F13"; fileinto :copy "F14"; fileinto :copy "F15"; fileinto :copy "F16";
fileinto :copy "F17"; fileinto :copy "F18"; fileinto :copy "F19"; fileinto :copy "F20";
fileinto :copy "F21"; fileinto :copy "F22"; fileinto :copy "F23"; fileinto :copy "F24";
fileinto :copy "F25"; fileinto :copy "F26"; fileinto :copy "F27"; fileinto :copy "F28";
fileinto :copy "F29"; fileinto :copy "F30"; fileinto :copy "F31";
if exists "list-id" {
    fileinto :copy "F32";
    fileinto :copy "F33";
}
