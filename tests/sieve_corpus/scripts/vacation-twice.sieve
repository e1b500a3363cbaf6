# RFC 5230 4.7: vacation more than once in a script is an error
require "vacation";
vacation "first";
if true {
    vacation :handle "other" "second";
}
